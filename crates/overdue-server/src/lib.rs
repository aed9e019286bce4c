//! # overdue-server
//!
//! overdue's HTTP API (axum) over one embedded store: the order service (products, orders and
//! their state machine), generic timers for other systems (an HTTP callback when due), dead
//! letters, `/healthz`, Prometheus `/metrics` and the OpenAPI document at `/openapi.json`.
//! The routes, bodies and errors are documented in `docs/api.md` and in [`OPENAPI_JSON`].
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use overdue_server::{App, AppConfig, check_bind, serve};
//! let addr: std::net::SocketAddr = "127.0.0.1:8080".parse()?;
//! let cfg = AppConfig::default();
//! check_bind(addr, cfg.token.as_deref())?;
//! let app = App::start(cfg).await?;
//! let listener = tokio::net::TcpListener::bind(addr).await?;
//! serve(listener, app.router(), async { let _ = tokio::signal::ctrl_c().await; }).await?;
//! app.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! ## Guarantees
//!
//! - **No plain-text errors.** Every error, including malformed JSON, a wrong content type, an
//!   oversized body, an unknown route and a handler panic, answers
//!   `{"error":{"code":"…","message":"…"}}` with a documented status ([`ApiErrorCode`] lists
//!   the codes). A refused request changes nothing.
//! - **Auth.** With a token configured, every route except `/healthz` and `/openapi.json` needs
//!   `Authorization: Bearer <token>`; [`check_bind`] refuses a non-loopback address without one.
//! - **Callbacks.** A generic timer POSTs its payload, byte for byte as the client sent it, to
//!   its callback URL, signed with HMAC-SHA256 when a secret is configured (see
//!   [`callback::sign`]); a non-2xx answer or a timeout is a failed attempt that the engine
//!   retries with backoff and finally dead-letters.
//! - **Outbox.** Order notifications (reminders, …) committed by the order service are relayed
//!   at least once to the webhook URL, or logged when none is set.

use std::fmt;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use overdue::{Clock, Engine, EngineConfig, ExternalTrigger, Limits, QueueConfig, ShutdownReport, Store, SystemClock, TriggerKind};
use overdue_orders::{OrderBackend, OrderConfig, OrderError, OrderService};
use overdue_sql::SqliteStore;
use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;

mod api;
pub mod callback;
mod dashboard;
mod error;
mod extract;
mod metrics_export;
mod outbox;

pub use api::ROUTES;
pub use error::ApiErrorCode;

/// The OpenAPI 3.1 document served at `GET /openapi.json` (the file `src/openapi.json`).
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// Default store URL: the embedded SQLite file under `./overdue-data/`.
pub const DEFAULT_BACKEND_URL: &str = overdue::DEFAULT_STORE_URL;
/// Default order database when the timers are in Redis.
pub const DEFAULT_ORDERS_URL: &str = "sqlite:overdue-data/orders.db";
/// Default request body limit: 64 KiB.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Default timeout of one callback or webhook delivery.
pub const DEFAULT_CALLBACK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default pause between two outbox relay passes.
pub const DEFAULT_OUTBOX_INTERVAL: Duration = Duration::from_millis(200);
/// Default time [`App::shutdown`] lets running handlers finish.
pub const DEFAULT_SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// `Result` with [`ServerError`].
pub type Result<T, E = ServerError> = std::result::Result<T, E>;

/// What can stop the server from starting or serving.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServerError {
    /// A configuration value is invalid or unsafe.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The store or the engine failed.
    #[error(transparent)]
    Engine(#[from] overdue::Error),
    /// The order service failed to open.
    #[error(transparent)]
    Orders(#[from] OrderError),
    /// Socket I/O failed.
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

/// Everything [`App::start`] needs. `Default` gives the documented defaults: the embedded store
/// at [`DEFAULT_BACKEND_URL`], the wheel trigger, no token, no secret, no webhook (reminders
/// are logged), a 64 KiB body limit and the system clock.
#[derive(Clone)]
pub struct AppConfig {
    /// Store URL: `sqlite:PATH`, `postgres://…` or `mysql://…` (the order tables go into the
    /// same database as the timers), or `redis://…` (timers in Redis, orders in
    /// [`AppConfig::orders_url`]).
    pub backend_url: String,
    /// Where the orders live when the timers are in Redis: a `sqlite:PATH` URL (default
    /// [`DEFAULT_ORDERS_URL`]). Refused with a SQL backend (there the orders go beside the timers).
    pub orders_url: Option<String>,
    /// What wakes the engine: wheel (default), heap or scan. Unused with
    /// [`AppConfig::external_trigger`].
    pub trigger: TriggerKind,
    /// A trigger outside the process (RabbitMQ, Redis key expiry) that does the waiting instead
    /// of `trigger`, with the store as the source of truth (see `overdue_core::trigger`). Needs
    /// a `sqlite:` backend: its outbox is turned on (`outbox=true` unless the URL sets it), so an
    /// order's timers and their notices commit in the order's transaction and the engine's relay
    /// publishes them. Other backends are refused. Default: none.
    pub external_trigger: Option<Arc<dyn ExternalTrigger>>,
    /// Order timeouts.
    pub order: OrderConfig,
    /// Bearer token every route except `/healthz` and `/openapi.json` requires, if set.
    pub token: Option<String>,
    /// HMAC-SHA256 key signing callbacks and webhooks (`X-Overdue-Signature`), if set.
    pub callback_secret: Option<String>,
    /// Where the outbox relay POSTs order notifications; logged at info level when unset.
    pub webhook_url: Option<String>,
    /// Largest request body, in bytes; larger requests get 413. Also bounds a generic timer's
    /// stored payload (at least the engine's 64 KiB default).
    pub body_limit: usize,
    /// The clock of the engine and the order service (a `ManualClock` in tests).
    pub clock: Arc<dyn Clock>,
    /// Retries, backoff and concurrency of generic-timer callbacks (every queue without a
    /// handler of its own). Default: [`QueueConfig::default`] (5 attempts, 1 s doubling backoff).
    pub callback_queue: QueueConfig,
    /// Timeout of one callback / webhook HTTP request. Default 10 s.
    pub callback_timeout: Duration,
    /// Pause between outbox relay passes. Default 200 ms.
    pub outbox_interval: Duration,
    /// How long [`App::shutdown`] lets running handlers finish. Default 10 s.
    pub shutdown_grace: Duration,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            backend_url: DEFAULT_BACKEND_URL.to_owned(),
            orders_url: None,
            trigger: TriggerKind::default(),
            external_trigger: None,
            order: OrderConfig::default(),
            token: None,
            callback_secret: None,
            webhook_url: None,
            body_limit: DEFAULT_BODY_LIMIT,
            clock: Arc::new(SystemClock),
            callback_queue: QueueConfig::default(),
            callback_timeout: DEFAULT_CALLBACK_TIMEOUT,
            outbox_interval: DEFAULT_OUTBOX_INTERVAL,
            shutdown_grace: DEFAULT_SHUTDOWN_GRACE,
        }
    }
}

impl fmt::Debug for AppConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Secrets are never printed.
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("AppConfig")
            .field("backend_url", &self.backend_url)
            .field("orders_url", &self.orders_url)
            .field("trigger", &self.trigger)
            .field("order", &self.order)
            .field("token", &redact(&self.token))
            .field("callback_secret", &redact(&self.callback_secret))
            .field("webhook_url", &self.webhook_url)
            .field("body_limit", &self.body_limit)
            .field("clock", &self.clock)
            .field("callback_queue", &self.callback_queue)
            .field("callback_timeout", &self.callback_timeout)
            .field("outbox_interval", &self.outbox_interval)
            .field("shutdown_grace", &self.shutdown_grace)
            .finish()
    }
}

impl AppConfig {
    /// Checks the values that [`App::start`] cannot correct.
    pub fn validate(&self) -> Result<()> {
        if let Some(t) = &self.token {
            check_token(t)?;
        }
        if self.callback_secret.as_deref() == Some("") {
            return Err(ServerError::Config("the callback secret must not be empty when set".into()));
        }
        if let Some(url) = &self.webhook_url {
            callback::check_url(url).map_err(|e| ServerError::Config(format!("webhook url: {e}")))?;
        }
        if self.body_limit == 0 || self.body_limit > overdue::limits::MAX_PAYLOAD_LIMIT {
            return Err(ServerError::Config(format!(
                "body limit {} must be within 1..={} bytes",
                self.body_limit,
                overdue::limits::MAX_PAYLOAD_LIMIT
            )));
        }
        if self.callback_timeout.is_zero() || self.callback_timeout >= self.callback_queue.timeout {
            return Err(ServerError::Config(format!(
                "callback timeout {:?} must be positive and shorter than the callback queue's handler timeout {:?}",
                self.callback_timeout, self.callback_queue.timeout
            )));
        }
        if self.outbox_interval.is_zero() {
            return Err(ServerError::Config("outbox interval must be positive".into()));
        }
        Ok(())
    }
}

fn check_token(token: &str) -> Result<()> {
    if token.is_empty() {
        return Err(ServerError::Config("the API token must not be empty when set".into()));
    }
    if !token.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(ServerError::Config("the API token must be printable ASCII without spaces".into()));
    }
    Ok(())
}

/// Refuses to serve on a non-loopback address without a bearer token: the API can create and
/// cancel timers that call arbitrary URLs, so it must not be open to a network by accident.
pub fn check_bind(addr: SocketAddr, token: Option<&str>) -> Result<()> {
    match token {
        Some(t) => check_token(t),
        None if addr.ip().is_loopback() => Ok(()),
        None => Err(ServerError::Config(format!(
            "refusing to listen on {addr} without an API token: anyone who can reach it could create, \
             cancel and fire timers; set a token (OVERDUE_TOKEN / --token) or bind to 127.0.0.1"
        ))),
    }
}

/// State shared by the request handlers and the background tasks.
pub(crate) struct AppState {
    pub(crate) engine: Arc<Engine>,
    pub(crate) orders: Arc<OrderService>,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) token: Option<String>,
    pub(crate) body_limit: usize,
    pub(crate) delivery: Arc<callback::Delivery>,
    pub(crate) webhook_url: Option<String>,
    pub(crate) metrics: metrics_export::Scrape,
    /// Keeps outbox relay passes from overlapping.
    pub(crate) relay_lock: tokio::sync::Mutex<()>,
}

impl fmt::Debug for AppState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AppState").field("engine", &self.engine).field("orders", &self.orders).finish_non_exhaustive()
    }
}

/// A running service: the engine with the order handlers and the callback handler, the order
/// service and the outbox relay. Build the HTTP side with [`App::router`] and [`serve`]; stop
/// with [`App::shutdown`] (dropping it aborts the background tasks like a crash would).
pub struct App {
    /// The timer engine.
    pub engine: Arc<Engine>,
    /// The order service.
    pub orders: Arc<OrderService>,
    state: Arc<AppState>,
    relay: Mutex<Option<JoinHandle<()>>>,
    stop_relay: watch::Sender<bool>,
    shutdown_grace: Duration,
}

impl fmt::Debug for App {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("App").field("engine", &self.engine).field("orders", &self.orders).finish_non_exhaustive()
    }
}

impl App {
    /// Opens the store named by `cfg.backend_url`, the order service on it, and starts the
    /// engine (order handlers plus the callback handler for every other queue) and the outbox
    /// relay on the current tokio runtime.
    pub async fn start(cfg: AppConfig) -> Result<App> {
        cfg.validate()?;
        metrics_export::install();
        // An external trigger publishes from the store's outbox, written in the same transaction
        // as the order and its timers: the SQL stores (SQLite, PostgreSQL, MySQL) have one.
        let sql = ["sqlite:", "postgres://", "postgresql://", "mysql://"].iter().any(|s| cfg.backend_url.starts_with(s));
        let backend_url = match &cfg.external_trigger {
            None => cfg.backend_url.clone(),
            Some(t) if sql => {
                if cfg.backend_url.contains("outbox=") {
                    cfg.backend_url.clone()
                } else {
                    let sep = if cfg.backend_url.contains('?') { '&' } else { '?' };
                    tracing::debug!(trigger = t.name(), "turning the store's outbox on for the external trigger");
                    format!("{}{sep}outbox=true", cfg.backend_url)
                }
            }
            Some(t) => {
                return Err(ServerError::Config(format!(
                    "the {} trigger needs the timers in a SQL store (sqlite:PATH, postgres://…, mysql://…, whose \
                     outbox it publishes from); backend {} has no outbox",
                    t.name(),
                    overdue::redact_url(&cfg.backend_url)
                )));
            }
        };
        let (backend, store) = open_backend(&backend_url, cfg.orders_url.as_deref()).await?;
        let orders = OrderService::open(backend, cfg.clock.clone(), cfg.order.clone()).await?;
        let delivery = Arc::new(callback::Delivery::new(cfg.callback_secret.clone(), cfg.callback_timeout, cfg.clock.clone())?);
        let limits = Limits::with_max_payload(cfg.body_limit.max(overdue::limits::DEFAULT_MAX_PAYLOAD))?;
        let mut builder = Engine::builder(store)
            .clock(cfg.clock.clone())
            .config(EngineConfig { trigger: cfg.trigger, ..EngineConfig::default() })
            .limits(limits);
        if let Some(t) = &cfg.external_trigger {
            builder = builder.external_trigger(t.clone());
        }
        let builder = orders
            .register_handlers(builder)
            .fallback_handler(cfg.callback_queue.clone(), callback::CallbackHandler::new(delivery.clone()));
        let engine = Arc::new(builder.start().await?);
        orders.attach(engine.clone());
        let state = Arc::new(AppState {
            engine: engine.clone(),
            orders: orders.clone(),
            clock: cfg.clock.clone(),
            token: cfg.token.clone(),
            body_limit: cfg.body_limit,
            delivery,
            webhook_url: cfg.webhook_url.clone(),
            metrics: metrics_export::Scrape::new(),
            relay_lock: tokio::sync::Mutex::new(()),
        });
        let (stop_relay, stop_rx) = watch::channel(false);
        let relay = tokio::spawn(outbox::run(state.clone(), cfg.outbox_interval, stop_rx));
        tracing::info!(backend = %cfg.backend_url, trigger = %engine.stats().trigger, auth = cfg.token.is_some(),
            signed = cfg.callback_secret.is_some(), webhook = cfg.webhook_url.as_deref().unwrap_or("<log>"), "overdue app started");
        Ok(App { engine, orders, state, relay: Mutex::new(Some(relay)), stop_relay, shutdown_grace: cfg.shutdown_grace })
    }

    /// The HTTP API. Cheap; every router shares this app's state.
    pub fn router(&self) -> axum::Router {
        api::router(self.state.clone())
    }

    /// Runs one outbox relay pass now (the background task does this every `outbox_interval`).
    /// Returns how many messages were delivered (or logged).
    pub async fn relay_outbox_once(&self) -> Result<usize> {
        Ok(outbox::pass(&self.state).await?.delivered)
    }

    /// Stops the outbox relay (after its current pass), then the engine: no new claims, running
    /// handlers get the configured grace period, the rest are released to fire again next start.
    pub async fn shutdown(&self) -> ShutdownReport {
        let _ = self.stop_relay.send(true);
        let relay = self.relay.lock().take();
        if let Some(mut relay) = relay
            && tokio::time::timeout(self.shutdown_grace, &mut relay).await.is_err()
        {
            relay.abort();
        }
        self.engine.shutdown(self.shutdown_grace).await
    }
}

impl Drop for App {
    fn drop(&mut self) {
        if let Some(relay) = self.relay.lock().take() {
            relay.abort();
        }
    }
}

/// Opens the store a backend URL names, for the engine and for the order service (whose tables
/// go into the same database), with a clear error for a backend the order service cannot use.
async fn open_backend(url: &str, orders_url: Option<&str>) -> Result<(OrderBackend, Arc<dyn Store>)> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    if let Some(orders) = orders_url
        && (scheme != "redis" || !cfg!(feature = "redis"))
    {
        return Err(ServerError::Config(format!(
            "orders url {}: only with a redis:// backend; with {scheme}: the orders live beside the timers",
            overdue::redact_url(orders)
        )));
    }
    match scheme {
        #[cfg(feature = "redis")]
        "redis" => {
            let orders = orders_url.unwrap_or(DEFAULT_ORDERS_URL);
            if !orders.starts_with("sqlite:") {
                return Err(ServerError::Config(format!(
                    "orders url {}: with timers in Redis the orders live in SQLite (sqlite:PATH)",
                    overdue::redact_url(orders)
                )));
            }
            let timers = overdue::open(url).await?;
            let orders = SqliteStore::open_url(orders).await?;
            Ok((OrderBackend::SqliteRelayed(orders), timers))
        }
        "sqlite" => {
            let store = SqliteStore::open_url(url).await?;
            Ok((store.clone().into(), Arc::new(store)))
        }
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => {
            let store = overdue::postgres::PgStore::open_url(url).await?;
            Ok((store.clone().into(), Arc::new(store)))
        }
        #[cfg(feature = "mysql")]
        "mysql" => {
            let store = overdue::mysql::MysqlStore::open_url(url).await?;
            Ok((store.clone().into(), Arc::new(store)))
        }
        _ => Err(ServerError::Config(format!(
            "backend {}: the order service keeps its orders in a SQL database beside the timers; use \
             sqlite:PATH (e.g. {DEFAULT_BACKEND_URL}){}{}, or redis://HOST (timers in Redis, orders in SQLite)",
            overdue::redact_url(url),
            if cfg!(feature = "postgres") { ", postgres://USER@HOST/DB" } else { "" },
            if cfg!(feature = "mysql") { ", mysql://USER@HOST/DB" } else { "" },
        ))),
    }
}

/// Serves `router` on `listener` until `shutdown` completes, then stops accepting and lets
/// in-flight requests finish (graceful). Tests bind `127.0.0.1:0` and pass the listener.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: axum::Router,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        tracing::info!(%addr, "serving the overdue API");
    }
    axum::serve(listener, router).with_graceful_shutdown(shutdown).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_without_token_is_refused_with_a_clear_message() {
        let public: SocketAddr = "0.0.0.0:8080".parse().expect("addr");
        let err = check_bind(public, None).expect_err("must refuse");
        assert!(err.to_string().contains("without an API token"), "{err}");
        assert!(check_bind(public, Some("s3cret-token")).is_ok());
        assert!(check_bind("127.0.0.1:0".parse().expect("addr"), None).is_ok());
        assert!(check_bind("[::1]:0".parse().expect("addr"), None).is_ok());
        assert!(check_bind(public, Some("")).is_err(), "an empty token is no token");
    }

    #[test]
    fn debug_never_prints_secrets() {
        let cfg = AppConfig {
            token: Some("tok-123".into()),
            callback_secret: Some("sec-456".into()),
            ..AppConfig::default()
        };
        let s = format!("{cfg:?}");
        assert!(!s.contains("tok-123") && !s.contains("sec-456"), "{s}");
    }

    #[tokio::test]
    async fn other_backends_are_refused_clearly() {
        let err = App::start(AppConfig { backend_url: "amqp://guest:secret@127.0.0.1/".into(), ..AppConfig::default() })
            .await
            .expect_err("the order service needs a SQL database");
        let text = err.to_string();
        assert!(text.contains("SQL database beside the timers") && text.contains("sqlite:"), "{text}");
        assert!(!text.contains("secret"), "the password is redacted: {text}");
    }
}
