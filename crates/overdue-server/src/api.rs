//! The routes and their handlers. [`ROUTES`] and the router are generated from one table (the
//! `routes!` invocation below), and a test checks that table against `openapi.json`, so the
//! served API, the OpenAPI document and `docs/api.md` cannot drift apart silently.
//!
//! Layers, outermost first: panic → JSON 500, tracing, request metrics, bearer auth (except
//! [`OPEN_PATHS`]), and the body guard (`Content-Length` over the limit → 413 before the body
//! is read; otherwise the limit is handed to the JSON extractor, which stops a chunked body at
//! the limit).

use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{DefaultBodyLimit, MatchedPath, Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router};
use base64::Engine as _;
use overdue::{DeadLetter, DeadLetterQuery, ListQuery, Timer, TimerSpec, TimerState};
use overdue_orders::{NewOrder, NewProduct, ORDER_QUEUES, Order, OrderEvent, OrderQuery, OrderStatus, Product};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::trace::TraceLayer;

use crate::callback::{Envelope, check_url};
use crate::error::{ApiError, ApiErrorCode};
use crate::extract::{ApiJson, ApiPath, ApiQuery, BodyLimit, DRAIN_MAX, drain, too_large};
use crate::{AppState, OPENAPI_JSON};

/// Routes that answer without a token (the dashboard's files hold no data; its script asks
/// for the token).
pub(crate) const OPEN_PATHS: [&str; 5] =
    ["/healthz", "/openapi.json", crate::dashboard::PATHS[0], crate::dashboard::PATHS[1], crate::dashboard::PATHS[2]];
/// How long `/healthz` waits for the store.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Order and product pages: default and largest size.
const PAGE_DEFAULT: u32 = 50;
const PAGE_MAX: u32 = 500;
/// Timer and dead-letter pages: default and largest size.
const TIMER_PAGE_DEFAULT: u32 = 100;
/// Bounded so one page of 64 KiB payloads stays near 64 MiB.
const TIMER_PAGE_MAX: u32 = 1_000;

macro_rules! routes {
    ($( $method:ident $path:literal => $handler:path ),* $(,)?) => {
        /// Every route the API serves, as `(method, path)` with the method in lowercase (the
        /// OpenAPI operation key) and the path in axum / OpenAPI `{param}` syntax.
        pub const ROUTES: &[(&str, &str)] = &[$( (stringify!($method), $path) ),*];

        fn add_routes(router: Router<Arc<AppState>>) -> Router<Arc<AppState>> {
            router $( .route($path, axum::routing::$method($handler)) )*
        }
    };
}

routes! {
    post "/v1/products" => create_product,
    get "/v1/products" => list_products,
    get "/v1/products/{id}" => get_product,
    post "/v1/orders" => create_order,
    get "/v1/orders" => list_orders,
    get "/v1/orders/{id}" => get_order,
    post "/v1/orders/{id}/pay" => pay,
    post "/v1/orders/{id}/cancel" => cancel,
    post "/v1/orders/{id}/ship" => ship,
    post "/v1/orders/{id}/confirm" => confirm,
    post "/v1/orders/{id}/refund" => request_refund,
    post "/v1/orders/{id}/refund/approve" => approve_refund,
    post "/v1/orders/{id}/refund/reject" => reject_refund,
    post "/v1/timers" => create_timer,
    get "/v1/timers" => list_timers,
    get "/v1/timers/{queue}/{key}" => get_timer,
    delete "/v1/timers/{queue}/{key}" => cancel_timer,
    post "/v1/timers/{queue}/{key}/fire-now" => fire_timer_now,
    post "/v1/timers/{queue}/{key}/reschedule" => reschedule_timer,
    get "/v1/dead-letters" => list_dead_letters,
    post "/v1/dead-letters/{id}/replay" => replay_dead_letter,
    get "/v1/overview" => overview,
    get "/healthz" => healthz,
    get "/metrics" => metrics,
    get "/openapi.json" => openapi,
}

type St = State<Arc<AppState>>;
type ApiResult<T> = Result<T, ApiError>;

/// The whole API over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    crate::metrics_export::install();
    let body_limit = state.body_limit;
    add_routes(Router::new())
        .route(crate::dashboard::PATHS[0], axum::routing::get(crate::dashboard::index))
        .route(crate::dashboard::PATHS[1], axum::routing::get(crate::dashboard::app_js))
        .route(crate::dashboard::PATHS[2], axum::routing::get(crate::dashboard::style_css))
        .fallback(no_route)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(body_limit))
        .layer(middleware::from_fn_with_state(state.clone(), body_guard))
        .layer(middleware::from_fn_with_state(state.clone(), auth))
        .layer(middleware::from_fn(http_metrics))
        .layer(TraceLayer::new_for_http())
        .layer(CatchPanicLayer::custom(|_panic: Box<dyn std::any::Any + Send>| {
            ApiError::new(ApiErrorCode::Internal, "the request handler panicked; this is a bug").into_response()
        }))
        .with_state(state)
}

// ---------------------------------------------------------------------------------------------
// middleware

async fn auth(State(st): St, req: Request, next: Next) -> Response {
    if let Some(token) = &st.token
        && !OPEN_PATHS.contains(&req.uri().path())
    {
        let presented = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        match presented {
            Some(t) if constant_time_eq(t.as_bytes(), token.as_bytes()) => {}
            Some(_) => return ApiError::new(ApiErrorCode::Unauthorized, "wrong bearer token").into_response(),
            None => {
                return ApiError::new(ApiErrorCode::Unauthorized, "missing bearer token: send authorization: Bearer <token>")
                    .into_response();
            }
        }
    }
    next.run(req).await
}

/// Equal-length comparison whose time does not depend on where the bytes differ.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Tells the body extractor the limit, and refuses a declared `Content-Length` over it before
/// reading (after a bounded drain, see [`crate::extract::DRAIN_MAX`]).
async fn body_guard(State(st): St, mut req: Request, next: Next) -> Response {
    let declared = req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if let Some(len) = declared
        && len > st.body_limit as u64
    {
        if len <= DRAIN_MAX as u64 {
            drain(req.into_body()).await;
        }
        return too_large(st.body_limit).into_response();
    }
    req.extensions_mut().insert(BodyLimit(st.body_limit));
    next.run(req).await
}

async fn http_metrics(req: Request, next: Next) -> Response {
    // Labels are static strings (no allocation per request) for every route and method the API
    // serves; anything else is labelled as it comes.
    let route: metrics::SharedString = match req.extensions().get::<MatchedPath>() {
        None => "unmatched".into(),
        Some(m) => match ROUTES.iter().find(|(_, path)| *path == m.as_str()) {
            Some((_, path)) => (*path).into(),
            None => m.as_str().to_owned().into(),
        },
    };
    let method: metrics::SharedString = match *req.method() {
        Method::GET => "GET".into(),
        Method::POST => "POST".into(),
        Method::DELETE => "DELETE".into(),
        ref other => other.as_str().to_owned().into(),
    };
    let start = Instant::now();
    let resp = next.run(req).await;
    metrics::counter!("overdue_http_requests_total", "method" => method.clone(), "route" => route.clone(), "status" => status_label(resp.status()))
        .increment(1);
    metrics::histogram!("overdue_http_request_duration_seconds", "method" => method, "route" => route)
        .record(start.elapsed().as_secs_f64());
    resp
}

/// The status code as a metric label, without allocating for the codes the API answers with.
fn status_label(status: StatusCode) -> metrics::SharedString {
    let code: &'static str = match status.as_u16() {
        200 => "200",
        201 => "201",
        204 => "204",
        400 => "400",
        401 => "401",
        404 => "404",
        405 => "405",
        409 => "409",
        413 => "413",
        415 => "415",
        422 => "422",
        500 => "500",
        503 => "503",
        other => return other.to_string().into(),
    };
    code.into()
}

async fn no_route(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!("no route for {method} {}", uri.path()))
}

async fn method_not_allowed(method: Method, uri: axum::http::Uri) -> ApiError {
    ApiError::new(ApiErrorCode::MethodNotAllowed, format!("{} does not accept {method}", uri.path()))
}

// ---------------------------------------------------------------------------------------------
// validation helpers

fn page(limit: Option<u32>, default: u32, max: u32) -> ApiResult<u32> {
    match limit {
        None => Ok(default),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(n) => Err(ApiError::invalid(format!("limit {n} must be within 1..={max}"))),
    }
}

fn not_reserved(queue: &str) -> ApiResult<()> {
    if ORDER_QUEUES.contains(&queue) {
        return Err(ApiError::invalid(format!(
            "queue {queue:?} belongs to the order service; use the order endpoints to change its timers"
        )));
    }
    Ok(())
}

/// Query values: an empty value (`?limit=`) counts as absent; anything else must parse.
fn opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: std::fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(|e| serde::de::Error::custom(format!("{s:?}: {e}"))),
    }
}

// ---------------------------------------------------------------------------------------------
// products

async fn create_product(State(st): St, ApiJson(p): ApiJson<NewProduct>) -> ApiResult<(StatusCode, Json<Product>)> {
    Ok((StatusCode::CREATED, Json(st.orders.create_product(p).await?)))
}

async fn get_product(State(st): St, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Product>> {
    Ok(Json(st.orders.get_product(&id).await?))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ProductsQuery {
    #[serde(default, deserialize_with = "opt")]
    after: Option<String>,
    #[serde(default, deserialize_with = "opt")]
    limit: Option<u32>,
}

#[derive(Debug, Serialize)]
struct ProductPage {
    products: Vec<Product>,
    /// Pass as `after` for the next page; null on the last page.
    next_after: Option<String>,
}

async fn list_products(State(st): St, ApiQuery(q): ApiQuery<ProductsQuery>) -> ApiResult<Json<ProductPage>> {
    let limit = page(q.limit, PAGE_DEFAULT, PAGE_MAX)?;
    let products = st.orders.list_products(q.after.as_deref(), limit).await?;
    let next_after = (products.len() as u32 >= limit).then(|| products.last().map(|p| p.id.clone())).flatten();
    Ok(Json(ProductPage { products, next_after }))
}

// ---------------------------------------------------------------------------------------------
// orders

async fn create_order(State(st): St, ApiJson(o): ApiJson<NewOrder>) -> ApiResult<(StatusCode, Json<Order>)> {
    Ok((StatusCode::CREATED, Json(st.orders.create_order(o).await?)))
}

/// A pending timer of an order, as `GET /v1/orders/{id}` shows it.
#[derive(Debug, Serialize)]
struct OrderTimer {
    queue: String,
    due_at: i64,
    generation: u64,
    attempts: u32,
    last_error: Option<String>,
    #[serde(flatten)]
    state: TimerState,
}

#[derive(Debug, Serialize)]
struct OrderDetail {
    #[serde(flatten)]
    order: Order,
    events: Vec<OrderEvent>,
    timers: Vec<OrderTimer>,
}

async fn get_order(State(st): St, ApiPath(id): ApiPath<String>) -> ApiResult<Json<OrderDetail>> {
    let order = st.orders.get_order(&id).await?;
    let events = st.orders.order_events(&id).await?;
    // With the timers in Redis, relay what the order's last writes changed first, so the timers
    // shown are the ones those writes left (a no-op when the timers live beside the orders).
    st.orders.flush_timers().await?;
    let lookups = ORDER_QUEUES.map(|q| st.engine.get(q, &id));
    let mut timers = Vec::new();
    for t in futures::future::join_all(lookups).await {
        if let Some(t) = t? {
            timers.push(OrderTimer {
                queue: t.queue,
                due_at: t.due_at,
                generation: t.generation,
                attempts: t.attempts,
                last_error: t.last_error,
                state: t.state,
            });
        }
    }
    timers.sort_by_key(|t| t.due_at);
    Ok(Json(OrderDetail { order, events, timers }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OrdersQuery {
    #[serde(default, deserialize_with = "opt")]
    status: Option<OrderStatus>,
    #[serde(default, deserialize_with = "opt")]
    buyer: Option<String>,
    #[serde(default, deserialize_with = "opt")]
    before: Option<String>,
    #[serde(default, deserialize_with = "opt")]
    limit: Option<u32>,
}

#[derive(Debug, Serialize)]
struct OrderPage {
    orders: Vec<Order>,
    /// Pass as `before` for the next page; null on the last page.
    next_before: Option<String>,
}

async fn list_orders(State(st): St, ApiQuery(q): ApiQuery<OrdersQuery>) -> ApiResult<Json<OrderPage>> {
    let limit = page(q.limit, PAGE_DEFAULT, PAGE_MAX)?;
    let query = OrderQuery { status: q.status, buyer: q.buyer, before: q.before, limit };
    let orders = st.orders.list_orders(&query).await?;
    let next_before = (orders.len() as u32 >= limit).then(|| orders.last().map(|o| o.id.clone())).flatten();
    Ok(Json(OrderPage { orders, next_before }))
}

macro_rules! transition {
    ($name:ident, $method:ident) => {
        async fn $name(State(st): St, ApiPath(id): ApiPath<String>) -> ApiResult<Json<Order>> {
            Ok(Json(st.orders.$method(&id).await?))
        }
    };
}

transition!(pay, pay);
transition!(cancel, cancel);
transition!(ship, ship);
transition!(confirm, confirm);
transition!(request_refund, request_refund);
transition!(approve_refund, approve_refund);
transition!(reject_refund, reject_refund);

// ---------------------------------------------------------------------------------------------
// generic timers

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewTimer {
    queue: String,
    key: String,
    #[serde(default)]
    due_at: Option<i64>,
    #[serde(default)]
    delay_ms: Option<i64>,
    callback_url: String,
    #[serde(default)]
    payload: Option<Box<RawValue>>,
}

#[derive(Debug, Serialize)]
struct Scheduled {
    queue: String,
    key: String,
    due_at: i64,
    generation: u64,
}

async fn create_timer(State(st): St, ApiJson(t): ApiJson<NewTimer>) -> ApiResult<(StatusCode, Json<Scheduled>)> {
    overdue::limits::check_queue(&t.queue)?;
    overdue::limits::check_key(&t.key)?;
    not_reserved(&t.queue)?;
    check_url(&t.callback_url).map_err(|e| ApiError::invalid(format!("invalid callback_url: {e}")))?;
    let due_at = due_from(&st, t.due_at, t.delay_ms)?;
    let payload = match t.payload {
        Some(p) => p,
        None => RawValue::from_string("null".to_owned()).map_err(|e| ApiError::new(ApiErrorCode::Internal, e.to_string()))?,
    };
    let env = Envelope { callback_url: t.callback_url, payload };
    let bytes = serde_json::to_vec(&env).map_err(|e| ApiError::new(ApiErrorCode::Internal, e.to_string()))?;
    let spec = TimerSpec::new(t.queue.clone(), t.key.clone(), due_at).with_payload(bytes);
    let generation = st.engine.schedule(spec).await?;
    Ok((StatusCode::CREATED, Json(Scheduled { queue: t.queue, key: t.key, due_at, generation })))
}

/// A stored payload as the API shows it: a generic timer's callback and JSON payload; other
/// JSON as `payload`; anything else as `payload_base64`.
#[derive(Debug, Default, Serialize)]
struct PayloadView {
    #[serde(skip_serializing_if = "Option::is_none")]
    callback_url: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload: Option<Box<RawValue>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    payload_base64: Option<String>,
}

impl PayloadView {
    fn of(bytes: &[u8]) -> Self {
        if let Some(env) = Envelope::decode(bytes) {
            return PayloadView { callback_url: Some(env.callback_url), payload: Some(env.payload), payload_base64: None };
        }
        if bytes.is_empty() {
            return PayloadView::default();
        }
        match serde_json::from_slice::<Box<RawValue>>(bytes) {
            Ok(raw) => PayloadView { payload: Some(raw), ..PayloadView::default() },
            Err(_) => PayloadView {
                payload_base64: Some(base64::engine::general_purpose::STANDARD.encode(bytes)),
                ..PayloadView::default()
            },
        }
    }
}

#[derive(Debug, Serialize)]
struct TimerView {
    queue: String,
    key: String,
    due_at: i64,
    generation: u64,
    attempts: u32,
    last_error: Option<String>,
    #[serde(flatten)]
    state: TimerState,
    created_at: i64,
    updated_at: i64,
    #[serde(flatten)]
    payload: PayloadView,
}

impl From<Timer> for TimerView {
    fn from(t: Timer) -> Self {
        TimerView {
            payload: PayloadView::of(&t.payload),
            queue: t.queue,
            key: t.key,
            due_at: t.due_at,
            generation: t.generation,
            attempts: t.attempts,
            last_error: t.last_error,
            state: t.state,
            created_at: t.created_at,
            updated_at: t.updated_at,
        }
    }
}

async fn get_timer(State(st): St, ApiPath((queue, key)): ApiPath<(String, String)>) -> ApiResult<Json<TimerView>> {
    match st.engine.get(&queue, &key).await? {
        Some(t) => Ok(Json(t.into())),
        None => Err(ApiError::not_found(format!("no timer ({queue}, {key})"))),
    }
}

#[derive(Debug, Serialize)]
struct Cancelled {
    queue: String,
    key: String,
    cancelled: bool,
}

async fn cancel_timer(State(st): St, ApiPath((queue, key)): ApiPath<(String, String)>) -> ApiResult<Json<Cancelled>> {
    overdue::limits::check_queue(&queue)?;
    not_reserved(&queue)?;
    if st.engine.cancel(&queue, &key).await? {
        Ok(Json(Cancelled { queue, key, cancelled: true }))
    } else {
        Err(ApiError::not_found(format!("no timer ({queue}, {key})")))
    }
}

async fn fire_timer_now(State(st): St, ApiPath((queue, key)): ApiPath<(String, String)>) -> ApiResult<Json<Scheduled>> {
    overdue::limits::check_queue(&queue)?;
    not_reserved(&queue)?;
    let due_at = st.clock.now_ms();
    let generation = st.engine.reschedule(&queue, &key, due_at).await?;
    Ok(Json(Scheduled { queue, key, due_at, generation }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct NewDue {
    #[serde(default)]
    due_at: Option<i64>,
    #[serde(default)]
    delay_ms: Option<i64>,
}

/// `due_at`, or now + `delay_ms`: exactly one of the two.
fn due_from(st: &AppState, due_at: Option<i64>, delay_ms: Option<i64>) -> ApiResult<i64> {
    match (due_at, delay_ms) {
        (Some(due), None) => Ok(due),
        (None, Some(delay)) if delay >= 0 => Ok(st.clock.now_ms().saturating_add(delay)),
        (None, Some(delay)) => Err(ApiError::invalid(format!("delay_ms {delay} must not be negative"))),
        _ => Err(ApiError::invalid("give exactly one of due_at (ms since the epoch) and delay_ms")),
    }
}

async fn reschedule_timer(
    State(st): St,
    ApiPath((queue, key)): ApiPath<(String, String)>,
    ApiJson(body): ApiJson<NewDue>,
) -> ApiResult<Json<Scheduled>> {
    overdue::limits::check_queue(&queue)?;
    overdue::limits::check_key(&key)?;
    not_reserved(&queue)?;
    let due_at = due_from(&st, body.due_at, body.delay_ms)?;
    let generation = st.engine.reschedule(&queue, &key, due_at).await?;
    Ok(Json(Scheduled { queue, key, due_at, generation }))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TimersQuery {
    #[serde(default, deserialize_with = "opt")]
    queue: Option<String>,
    #[serde(default, deserialize_with = "opt")]
    due_from: Option<i64>,
    #[serde(default, deserialize_with = "opt")]
    due_to: Option<i64>,
    #[serde(default, deserialize_with = "opt")]
    after_due: Option<i64>,
    #[serde(default, deserialize_with = "opt")]
    after_queue: Option<String>,
    #[serde(default, deserialize_with = "opt")]
    after_key: Option<String>,
    #[serde(default, deserialize_with = "opt")]
    limit: Option<u32>,
}

#[derive(Debug, Serialize)]
struct TimerCursor {
    after_due: i64,
    after_queue: String,
    after_key: String,
}

#[derive(Debug, Serialize)]
struct TimerPage {
    timers: Vec<TimerView>,
    /// Query parameters of the next page; null on the last page.
    next: Option<TimerCursor>,
}

async fn list_timers(State(st): St, ApiQuery(q): ApiQuery<TimersQuery>) -> ApiResult<Json<TimerPage>> {
    let limit = page(q.limit, TIMER_PAGE_DEFAULT, TIMER_PAGE_MAX)?;
    let after = match (q.after_due, q.after_queue, q.after_key) {
        (None, None, None) => None,
        (Some(d), Some(qu), Some(k)) => Some((d, qu, k)),
        _ => return Err(ApiError::invalid("after_due, after_queue and after_key go together: give all three or none")),
    };
    if let (Some(from), Some(to)) = (q.due_from, q.due_to)
        && from > to
    {
        return Err(ApiError::invalid(format!("due_from {from} is after due_to {to}")));
    }
    let query = ListQuery { queue: q.queue, due_from: q.due_from, due_to: q.due_to, after, limit };
    let timers = st.engine.list(&query).await?;
    let next = (timers.len() as u32 >= limit)
        .then(|| timers.last().map(|t| TimerCursor { after_due: t.due_at, after_queue: t.queue.clone(), after_key: t.key.clone() }))
        .flatten();
    Ok(Json(TimerPage { timers: timers.into_iter().map(TimerView::from).collect(), next }))
}

// ---------------------------------------------------------------------------------------------
// dead letters

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeadLettersQuery {
    #[serde(default, deserialize_with = "opt")]
    queue: Option<String>,
    #[serde(default, deserialize_with = "opt")]
    after_id: Option<i64>,
    #[serde(default, deserialize_with = "opt")]
    limit: Option<u32>,
}

#[derive(Debug, Serialize)]
struct DeadLetterView {
    id: i64,
    queue: String,
    key: String,
    generation: u64,
    due_at: i64,
    attempts: u32,
    error: String,
    failed_at: i64,
    #[serde(flatten)]
    payload: PayloadView,
}

impl From<DeadLetter> for DeadLetterView {
    fn from(d: DeadLetter) -> Self {
        DeadLetterView {
            payload: PayloadView::of(&d.payload),
            id: d.id,
            queue: d.queue,
            key: d.key,
            generation: d.generation,
            due_at: d.due_at,
            attempts: d.attempts,
            error: d.error,
            failed_at: d.failed_at,
        }
    }
}

#[derive(Debug, Serialize)]
struct DeadLetterPage {
    dead_letters: Vec<DeadLetterView>,
    /// Pass as `after_id` for the next page; null on the last page.
    next_after_id: Option<i64>,
}

async fn list_dead_letters(State(st): St, ApiQuery(q): ApiQuery<DeadLettersQuery>) -> ApiResult<Json<DeadLetterPage>> {
    let limit = page(q.limit, TIMER_PAGE_DEFAULT, TIMER_PAGE_MAX)?;
    let query = DeadLetterQuery { queue: q.queue, after_id: q.after_id, limit };
    let dls = st.engine.dead_letters(&query).await?;
    let next_after_id = (dls.len() as u32 >= limit).then(|| dls.last().map(|d| d.id)).flatten();
    Ok(Json(DeadLetterPage { dead_letters: dls.into_iter().map(DeadLetterView::from).collect(), next_after_id }))
}

#[derive(Debug, Serialize)]
struct Replayed {
    id: i64,
    generation: u64,
}

async fn replay_dead_letter(State(st): St, ApiPath(id): ApiPath<i64>) -> ApiResult<Json<Replayed>> {
    if id < 1 {
        return Err(ApiError::invalid(format!("dead letter id {id} must be a positive integer")));
    }
    let generation = st.engine.replay(id).await?;
    Ok(Json(Replayed { id, generation }))
}

// ---------------------------------------------------------------------------------------------
// operations

fn lateness_json(l: &overdue::LatenessSummary) -> serde_json::Value {
    serde_json::json!({
        "count": l.count, "p50_ms": l.p50_ms, "p90_ms": l.p90_ms, "p99_ms": l.p99_ms, "max_ms": l.max_ms,
        "mean_ms": (l.mean_ms * 10.0).round() / 10.0,
    })
}

/// Everything the dashboard's overview shows, in one call: this node and its health, the
/// engine's counters and lateness (since start and recent), per-queue counts with the due-time
/// histogram, and orders by status.
async fn overview(State(st): St) -> ApiResult<Json<serde_json::Value>> {
    let now = st.clock.now_ms();
    let (counts, due, statuses, leases) =
        tokio::join!(st.engine.counts(), st.engine.due_histogram(), st.orders.status_counts(), st.engine.nodes());
    let (counts, due, statuses, leases) = (counts?, due?, statuses?, leases?);
    let s = st.engine.stats();
    let store = st.engine.store().capabilities().name;
    let queues: Vec<serde_json::Value> = counts
        .iter()
        .map(|c| {
            let b = due.queues.iter().find(|b| b.queue == c.queue).cloned().unwrap_or_default();
            serde_json::json!({
                "queue": c.queue, "pending": c.pending, "in_flight": c.in_flight, "dead": c.dead,
                "due": {"overdue": b.overdue, "next_minute": b.next_minute, "next_hour": b.next_hour,
                        "next_day": b.next_day, "later": b.later},
            })
        })
        .collect();
    let orders: serde_json::Map<String, serde_json::Value> =
        statuses.into_iter().map(|(status, n)| (status.as_str().to_owned(), n.into())).collect();
    let node = serde_json::json!({
        "id": st.engine.node_id(), "store": store, "trigger": s.trigger, "orders_backend": st.orders.backend_name(),
        "store_healthy": s.store_healthy, "store_error": s.store_error, "store_errors": s.store_errors,
        "trigger_healthy": s.trigger_healthy, "trigger_error": s.trigger_error,
    });
    // Every node the store knows (SQL stores: partition lease holders); without such a store,
    // just this one.
    let nodes: Vec<serde_json::Value> = if leases.is_empty() {
        vec![serde_json::json!({
            "id": st.engine.node_id(), "this": true, "alive": true, "partitions": null, "lease_until": null, "heartbeat_at": null,
        })]
    } else {
        leases
            .iter()
            .map(|n| {
                serde_json::json!({
                    "id": n.id, "this": n.this, "alive": n.alive, "partitions": n.partitions,
                    "lease_until": n.lease_until, "heartbeat_at": n.heartbeat_at,
                })
            })
            .collect()
    };
    Ok(Json(serde_json::json!({
        "now": now,
        "node": node,
        "nodes": nodes,
        "engine": {
            "scheduled": s.scheduled, "cancelled": s.cancelled, "fired": s.fired, "completed": s.completed,
            "retried": s.retried, "dead_lettered": s.dead_lettered, "handler_failures": s.handler_failures,
            "backstop_rescued": s.backstop_rescued, "stale_dropped": s.stale_dropped, "in_flight": s.in_flight,
            "resident": s.resident, "published": s.published, "lease_releases": s.lease_releases,
        },
        "lateness": lateness_json(&s.lateness),
        "recent_lateness": lateness_json(&s.recent_lateness),
        "recent_window_secs": overdue::RECENT_WINDOW.as_secs(),
        "queues": queues,
        "due_exact": due.exact,
        "orders": orders,
    })))
}

async fn healthz(State(st): St) -> Response {
    let store = st.engine.store().capabilities().name;
    // The running trigger (an external one, e.g. keyspace, names itself), not the configured kind.
    let trigger = st.engine.stats().trigger;
    match tokio::time::timeout(HEALTH_TIMEOUT, st.engine.counts()).await {
        Ok(Ok(_)) => {
            // The probe answered; the engine's own store calls may still have failed lately.
            let stats = st.engine.stats();
            Json(serde_json::json!({
                "status": "ok", "store": store, "trigger": trigger, "node_id": st.engine.node_id(),
                "store_errors": stats.store_errors, "store_healthy": stats.store_healthy,
            }))
            .into_response()
        }
        Ok(Err(e)) => unhealthy(store, ApiErrorCode::StoreError, e.to_string()),
        Err(_) => unhealthy(store, ApiErrorCode::StoreError, format!("the store did not answer within {HEALTH_TIMEOUT:?}")),
    }
}

fn unhealthy(store: &str, code: ApiErrorCode, message: String) -> Response {
    let body = serde_json::json!({
        "status": "unavailable",
        "store": store,
        "error": {"code": code.as_str(), "message": message},
    });
    (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
}

async fn metrics(State(st): St) -> Response {
    let text = crate::metrics_export::render(&st).await;
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], text).into_response()
}

async fn openapi() -> Response {
    ([(header::CONTENT_TYPE, "application/json")], OPENAPI_JSON).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openapi_lists_exactly_the_served_routes() {
        let doc: serde_json::Value = serde_json::from_str(OPENAPI_JSON).expect("openapi.json parses");
        assert_eq!(doc["openapi"].as_str().map(|v| v.starts_with("3.1")), Some(true), "OpenAPI 3.1");
        let paths = doc["paths"].as_object().expect("paths object");
        let mut documented = std::collections::BTreeSet::new();
        for (path, item) in paths {
            for method in item.as_object().expect("path item").keys() {
                if ["get", "post", "put", "delete", "patch", "head", "options"].contains(&method.as_str()) {
                    documented.insert((method.clone(), path.clone()));
                }
            }
        }
        let served: std::collections::BTreeSet<(String, String)> =
            ROUTES.iter().map(|(m, p)| ((*m).to_owned(), (*p).to_owned())).collect();
        assert_eq!(served.len(), ROUTES.len(), "a route is listed twice: {ROUTES:?}");
        let undocumented: Vec<_> = served.difference(&documented).collect();
        let unserved: Vec<_> = documented.difference(&served).collect();
        assert!(undocumented.is_empty() && unserved.is_empty(), "undocumented: {undocumented:?}; documented but not served: {unserved:?}");
    }

    #[test]
    fn openapi_documents_every_error_code() {
        for code in ApiErrorCode::ALL {
            assert!(OPENAPI_JSON.contains(&format!("\"{}\"", code.as_str())), "openapi.json lacks error code {}", code.as_str());
        }
    }

    #[test]
    fn docs_api_md_mentions_every_route() {
        let md = include_str!("../../../docs/api.md");
        for (method, path) in ROUTES {
            let line = format!("{} {}", method.to_uppercase(), path);
            assert!(md.contains(&line), "docs/api.md lacks `{line}`");
        }
    }

    #[test]
    fn payload_views() {
        let v = PayloadView::of(br#"{"callback_url":"http://x/","payload":[1]}"#);
        assert_eq!(v.callback_url.as_deref(), Some("http://x/"));
        assert_eq!(v.payload.as_ref().map(|p| p.get()), Some("[1]"));
        let v = PayloadView::of(b"\xff\x00");
        assert_eq!(v.payload_base64.as_deref(), Some("/wA="));
        let v = PayloadView::of(br#"{"order":"o-1"}"#);
        assert!(v.callback_url.is_none() && v.payload.is_some());
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
    }
}
