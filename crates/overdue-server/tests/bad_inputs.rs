//! Every endpoint against a table of bad requests: each gets its documented 4xx with the JSON
//! error body, and nothing in the store changes.

mod common;

use common::{T0, TestServer, assert_error, send};
use overdue::QueueConfig;
use overdue_server::ROUTES;
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKEN: &str = "t0ken-for-tests";

#[derive(Clone, Copy, Debug)]
enum Auth {
    Good,
    Missing,
    Wrong,
    Basic,
}

#[derive(Clone, Debug)]
enum Body {
    None,
    /// With content-type application/json.
    Json(String),
    /// With the given content type (or none).
    Raw(Option<&'static str>, String),
}

#[derive(Debug)]
struct Case {
    method: &'static str,
    path: String,
    body: Body,
    auth: Auth,
    status: u16,
    code: &'static str,
}

fn case(method: &'static str, path: impl Into<String>, body: Body, status: u16, code: &'static str) -> Case {
    Case { method, path: path.into(), body, auth: Auth::Good, status, code }
}

fn j(v: &str) -> Body {
    Body::Json(v.to_owned())
}

/// What the API shows of the whole state, plus the engine's counts.
async fn snapshot(s: &TestServer) -> Vec<Value> {
    let mut out = Vec::new();
    for path in ["/v1/products?limit=500", "/v1/orders?limit=500", "/v1/timers?limit=1000", "/v1/dead-letters?limit=1000"] {
        let (st, v) = s.get(path).await;
        assert_eq!(st, 200, "{path}: {v}");
        out.push(v);
    }
    let counts = s.app.engine.counts().await.expect("counts");
    out.push(serde_json::to_value(counts).expect("counts json"));
    let statuses: Vec<(String, u64)> =
        s.app.orders.status_counts().await.expect("status counts").into_iter().map(|(st, n)| (st.to_string(), n)).collect();
    out.push(json!(statuses));
    out
}

async fn run(s: &TestServer, c: &Case) -> (u16, Value, Option<String>) {
    let method = reqwest::Method::from_bytes(c.method.as_bytes()).expect("method");
    let mut r = s.client.request(method, s.url(&c.path));
    r = match c.auth {
        Auth::Good => r.bearer_auth(TOKEN),
        Auth::Missing => r,
        Auth::Wrong => r.bearer_auth("not-the-token"),
        Auth::Basic => r.basic_auth("admin", Some(TOKEN)),
    };
    r = match &c.body {
        Body::None => r,
        Body::Json(b) => r.header("content-type", "application/json").body(b.clone()),
        Body::Raw(Some(ct), b) => r.header("content-type", *ct).body(b.clone()),
        Body::Raw(None, b) => r.body(b.clone()),
    };
    let resp = r.send().await.expect("send");
    let status = resp.status().as_u16();
    let ct = resp.headers().get("content-type").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = resp.text().await.expect("text");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)), ct)
}

async fn setup() -> (TestServer, String) {
    let s = TestServer::start_with(|c| {
        c.token = Some(TOKEN.into());
        c.callback_queue = QueueConfig { max_attempts: 1, ..QueueConfig::default() };
    })
    .await;
    let (st, v) = s.post("/v1/products", json!({"id": "p1", "name": "thing", "price_cents": 100, "stock": 5})).await;
    assert_eq!(st, 201, "{v}");
    let (st, o) = s.post("/v1/orders", json!({"buyer": "b", "items": [{"product_id": "p1", "quantity": 1}]})).await;
    assert_eq!(st, 201, "{o}");
    let oid = o["id"].as_str().expect("id").to_owned();
    let (st, v) = s.post("/v1/timers", json!({"queue": "gen", "key": "k1", "delay_ms": 60_000, "callback_url": "http://127.0.0.1:9/x"})).await;
    assert_eq!(st, 201, "{v}");
    // A dead letter: due now, its receiver refuses connections, one attempt allowed.
    let (st, v) = s.post("/v1/timers", json!({"queue": "gen", "key": "dead", "due_at": T0, "callback_url": "http://127.0.0.1:9/x"})).await;
    assert_eq!(st, 201, "{v}");
    s.app.engine.settle().await;
    let (_, dl) = s.get("/v1/dead-letters").await;
    assert_eq!(dl["dead_letters"].as_array().map(Vec::len), Some(1), "{dl}");
    (s, oid)
}

fn table(oid: &str) -> Vec<Case> {
    let big = format!(r#"{{"name":"{}","price_cents":1,"stock":1}}"#, "x".repeat(70 * 1024));
    let big_timer = format!(
        r#"{{"queue":"gen","key":"big","delay_ms":1,"callback_url":"http://127.0.0.1:9/","payload":"{}"}}"#,
        "x".repeat(70 * 1024)
    );
    let long_q = "q".repeat(65);
    let long_buyer = "b".repeat(129);
    let far = T0 + 121 * 366 * 86_400_000;
    let timer = |extra: &str| format!(r#"{{"queue":"gen","key":"k2","callback_url":"http://127.0.0.1:9/",{extra}}}"#);
    let mut v = vec![
        // --- products: create
        case("POST", "/v1/products", j(r#"{"name":"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(""), 400, "invalid_input"),
        case("POST", "/v1/products", j("[]"), 400, "invalid_input"),
        case("POST", "/v1/products", j("null"), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":"12","stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":12.5,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":1,"stock":-1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":-1,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":1e13,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":1000000000001,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":99999999999999999999,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"n","price_cents":1,"stock":1,"color":"red"}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"price_cents":1,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":null,"price_cents":1,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"name":"  ","price_cents":1,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"id":"a b","name":"n","price_cents":1,"stock":1}"#), 400, "invalid_input"),
        case("POST", "/v1/products", j(r#"{"id":"p1","name":"n","price_cents":1,"stock":1}"#), 409, "already_exists"),
        case("POST", "/v1/products", Body::Raw(Some("text/plain"), r#"{"name":"n","price_cents":1,"stock":1}"#.into()), 415, "unsupported_media_type"),
        case("POST", "/v1/products", Body::Raw(None, r#"{"name":"n","price_cents":1,"stock":1}"#.into()), 415, "unsupported_media_type"),
        case("POST", "/v1/products", Body::Raw(Some("application/x-www-form-urlencoded"), "name=n".into()), 415, "unsupported_media_type"),
        case("POST", "/v1/products", Body::Json(big), 413, "payload_too_large"),
        case("POST", "/v1/products", j(&format!("{}1{}", "[".repeat(10_000), "]".repeat(10_000))), 400, "invalid_input"),
        case("POST", "/v1/products", j("{\"name\":\"\u{0}\",\"price_cents\":1,\"stock\":1}"), 400, "invalid_input"),
        // --- products: get, list
        case("GET", "/v1/products/a%20b", Body::None, 400, "invalid_input"),
        case("GET", format!("/v1/products/{}", "x".repeat(65)), Body::None, 400, "invalid_input"),
        case("GET", "/v1/products/nope", Body::None, 404, "not_found"),
        case("GET", "/v1/products?limit=0", Body::None, 400, "invalid_input"),
        case("GET", "/v1/products?limit=-1", Body::None, 400, "invalid_input"),
        case("GET", "/v1/products?limit=abc", Body::None, 400, "invalid_input"),
        case("GET", "/v1/products?limit=501", Body::None, 400, "invalid_input"),
        case("GET", "/v1/products?limit=1&limit=2", Body::None, 400, "invalid_input"),
        case("GET", "/v1/products?after=a%20b", Body::None, 400, "invalid_input"),
        case("GET", "/v1/products?sort=name", Body::None, 400, "invalid_input"),
        // --- orders: create
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":-1}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":0}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":10001}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":"1"}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1.5}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":{"product_id":"p1","quantity":1}}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1,"gift":true}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1}],"coupon":"X"}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1},{"product_id":"p1","quantity":1}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"","items":[{"product_id":"p1","quantity":1}]}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(&format!(r#"{{"buyer":"{long_buyer}","items":[{{"product_id":"p1","quantity":1}}]}}"#)), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1}],"pay_timeout_ms":0}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1}],"pay_timeout_ms":-5}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1}],"pay_timeout_ms":999999999999}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"nope","quantity":1}]}"#), 404, "not_found"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":5}]}"#), 409, "out_of_stock"),
        case("POST", "/v1/orders", j(r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1}"#), 400, "invalid_input"),
        case("POST", "/v1/orders", Body::Raw(Some("text/plain"), r#"{"buyer":"b","items":[{"product_id":"p1","quantity":1}]}"#.into()), 415, "unsupported_media_type"),
        // --- orders: get, list
        case("GET", "/v1/orders/a%20b", Body::None, 400, "invalid_input"),
        case("GET", "/v1/orders/o-unknown", Body::None, 404, "not_found"),
        case("GET", "/v1/orders?status=bogus", Body::None, 400, "invalid_input"),
        case("GET", "/v1/orders?status=PAID", Body::None, 400, "invalid_input"),
        case("GET", "/v1/orders?limit=0", Body::None, 400, "invalid_input"),
        case("GET", "/v1/orders?limit=10000", Body::None, 400, "invalid_input"),
        case("GET", "/v1/orders?before=a%20b", Body::None, 400, "invalid_input"),
        case("GET", format!("/v1/orders?buyer={long_buyer}"), Body::None, 400, "invalid_input"),
        case("GET", "/v1/orders?page=2", Body::None, 400, "invalid_input"),
        // --- generic timers: create
        case("POST", "/v1/timers", j(&timer(r#""delay_ms":1,"queue2":1"#)), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"order.close","key":"k","delay_ms":1,"callback_url":"http://127.0.0.1:9/"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"refund.auto_approve","key":"k","delay_ms":1,"callback_url":"http://127.0.0.1:9/"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"bad queue","key":"k","delay_ms":1,"callback_url":"http://127.0.0.1:9/"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"","key":"k","delay_ms":1,"callback_url":"http://127.0.0.1:9/"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&format!(r#"{{"queue":"{long_q}","key":"k","delay_ms":1,"callback_url":"http://127.0.0.1:9/"}}"#)), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"","delay_ms":1,"callback_url":"http://127.0.0.1:9/"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"a\nb","delay_ms":1,"callback_url":"http://127.0.0.1:9/"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"k","delay_ms":1,"callback_url":"ftp://127.0.0.1/"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"k","delay_ms":1,"callback_url":"not a url"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"k","delay_ms":1,"callback_url":"javascript:alert(1)"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"k","delay_ms":1,"callback_url":"/relative"}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"k","delay_ms":1}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(r#"{"queue":"gen","key":"k","delay_ms":1,"callback_url":42}"#), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&timer(r#""delay_ms":1,"due_at":1"#)), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&timer(r#""payload":1"#)), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&timer(r#""delay_ms":-1"#)), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&timer(r#""due_at":-1"#)), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&timer(&format!(r#""due_at":{far}"#))), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&timer(r#""due_at":"soon""#)), 400, "invalid_input"),
        case("POST", "/v1/timers", j(&timer(r#""delay_ms":9223372036854775808"#)), 400, "invalid_input"),
        case("POST", "/v1/timers", Body::Json(big_timer), 413, "payload_too_large"),
        case("POST", "/v1/timers", Body::Raw(Some("text/plain"), timer(r#""delay_ms":1"#)), 415, "unsupported_media_type"),
        // --- generic timers: get, cancel, fire-now, list
        case("GET", "/v1/timers/bad%20queue/k1", Body::None, 400, "invalid_input"),
        case("GET", "/v1/timers/gen/nope", Body::None, 404, "not_found"),
        case("DELETE", format!("/v1/timers/order.close/{oid}"), Body::None, 400, "invalid_input"),
        case("DELETE", format!("/v1/timers/order.remind/{oid}"), Body::None, 400, "invalid_input"),
        case("DELETE", "/v1/timers/bad%20queue/k1", Body::None, 400, "invalid_input"),
        case("DELETE", "/v1/timers/gen/nope", Body::None, 404, "not_found"),
        case("POST", format!("/v1/timers/order.close/{oid}/fire-now"), Body::None, 400, "invalid_input"),
        case("POST", "/v1/timers/bad%20queue/k1/fire-now", Body::None, 400, "invalid_input"),
        case("POST", "/v1/timers/gen/nope/fire-now", Body::None, 404, "not_found"),
        case("GET", "/v1/timers?limit=0", Body::None, 400, "invalid_input"),
        case("GET", "/v1/timers?limit=1001", Body::None, 400, "invalid_input"),
        case("GET", "/v1/timers?after_due=5", Body::None, 400, "invalid_input"),
        case("GET", "/v1/timers?after_due=x&after_queue=q&after_key=k", Body::None, 400, "invalid_input"),
        case("GET", "/v1/timers?due_from=10&due_to=5", Body::None, 400, "invalid_input"),
        case("GET", "/v1/timers?queue=bad%20queue", Body::None, 400, "invalid_input"),
        case("GET", "/v1/timers?state=pending", Body::None, 400, "invalid_input"),
        // --- dead letters
        case("GET", "/v1/dead-letters?limit=0", Body::None, 400, "invalid_input"),
        case("GET", "/v1/dead-letters?limit=1001", Body::None, 400, "invalid_input"),
        case("GET", "/v1/dead-letters?queue=bad%20queue", Body::None, 400, "invalid_input"),
        case("GET", "/v1/dead-letters?after_id=x", Body::None, 400, "invalid_input"),
        case("GET", "/v1/dead-letters?id=1", Body::None, 400, "invalid_input"),
        case("POST", "/v1/dead-letters/abc/replay", Body::None, 400, "invalid_input"),
        case("POST", "/v1/dead-letters/99999/replay", Body::None, 404, "not_found"),
        case("POST", "/v1/dead-letters/0/replay", Body::None, 400, "invalid_input"),
        case("POST", "/v1/dead-letters/-9223372036854775808/replay", Body::None, 400, "invalid_input"),
        case("POST", "/v1/dead-letters/9223372036854775808/replay", Body::None, 400, "invalid_input"),
        case("GET", "/v1/dead-letters?after_id=-9223372036854775808", Body::None, 200, ""),
        case("GET", "/v1/timers?after_due=-9223372036854775808&after_queue=a&after_key=b&due_to=9223372036854775807", Body::None, 200, ""),
        case("GET", "/v1/timers/gen/%FF", Body::None, 400, "invalid_input"),
        case("GET", format!("/v1/timers/gen/{}", "k".repeat(257)), Body::None, 400, "invalid_input"),
        // --- unknown routes and methods
        case("GET", "/v2/products", Body::None, 404, "not_found"),
        case("GET", "/nope", Body::None, 404, "not_found"),
        case("GET", "/dashboard/nope.js", Body::None, 404, "not_found"),
        case("DELETE", "/v1/products", Body::None, 405, "method_not_allowed"),
        case("PUT", "/v1/orders", j("{}"), 405, "method_not_allowed"),
        case("GET", format!("/v1/orders/{oid}/pay"), Body::None, 405, "method_not_allowed"),
        // --- auth
        Case { auth: Auth::Wrong, ..case("GET", "/v1/products", Body::None, 401, "unauthorized") },
        Case { auth: Auth::Basic, ..case("GET", "/v1/products", Body::None, 401, "unauthorized") },
        Case { auth: Auth::Missing, ..case("POST", "/v1/products", j(r#"{"name":"n","price_cents":1,"stock":1}"#), 401, "unauthorized") },
        Case { auth: Auth::Wrong, ..case("POST", format!("/v1/orders/{oid}/pay"), Body::None, 401, "unauthorized") },
        Case { auth: Auth::Missing, ..case("POST", format!("/v1/orders/{oid}/cancel"), Body::None, 401, "unauthorized") },
        Case { auth: Auth::Missing, ..case("DELETE", "/v1/timers/gen/k1", Body::None, 401, "unauthorized") },
    ];
    // Illegal transitions of the pending order (pay and cancel are legal, so not in this table).
    for action in ["ship", "confirm", "refund", "refund/approve", "refund/reject"] {
        v.push(case("POST", format!("/v1/orders/{oid}/{action}"), Body::None, 409, "illegal_transition"));
    }
    // Every order action: a malformed and an unknown id.
    for action in ["pay", "cancel", "ship", "confirm", "refund", "refund/approve", "refund/reject"] {
        v.push(case("POST", format!("/v1/orders/a%20b/{action}"), Body::None, 400, "invalid_input"));
        v.push(case("POST", format!("/v1/orders/o-unknown/{action}"), Body::None, 404, "not_found"));
    }
    // Every protected route without a token and with a wrong one.
    for (method, path) in ROUTES {
        if ["/healthz", "/openapi.json"].contains(path) {
            continue;
        }
        let path = path.replace("{id}", "x").replace("{queue}", "gen").replace("{key}", "k1");
        let m: &'static str = match *method {
            "get" => "GET",
            "post" => "POST",
            "delete" => "DELETE",
            other => panic!("unexpected method {other}"),
        };
        for auth in [Auth::Missing, Auth::Wrong] {
            v.push(Case { auth, ..case(m, path.clone(), j("{}"), 401, "unauthorized") });
        }
    }
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_bad_request_gets_its_documented_error_and_changes_nothing() {
    let (s, oid) = setup().await;
    let before = snapshot(&s).await;
    let cases = table(&oid);
    let mut failures = Vec::new();
    for c in &cases {
        let (status, body, ct) = run(&s, c).await;
        let ok = if c.status == 200 {
            status == 200 && body.get("error").is_none()
        } else {
            status == c.status
            && body["error"]["code"] == c.code
            && body["error"]["message"].as_str().is_some_and(|m| !m.is_empty())
            && ct.as_deref() == Some("application/json")
        };
        if !ok {
            failures.push(format!("{} {} ({:?}, {:?}) → {status} {ct:?} {body}", c.method, c.path, c.auth, truncate(&c.body)));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));
    // The open routes need no token; the illegal transitions reported the current status.
    let (st, _) = send(s.client.get(s.url("/healthz"))).await;
    assert_eq!(st, 200);
    let (st, _) = send(s.client.get(s.url("/openapi.json"))).await;
    assert_eq!(st, 200);
    let r = s.post_empty(&format!("/v1/orders/{oid}/ship")).await;
    assert_error(&r, 409, "illegal_transition");
    assert_eq!(r.1["error"]["status"], "pending_payment");

    assert_eq!(snapshot(&s).await, before, "a refused request changed the state");
    s.stop().await;
}

fn truncate(b: &Body) -> String {
    let s = format!("{b:?}");
    if s.len() > 120 { format!("{}…", &s[..120]) } else { s }
}

/// A chunked body (no content-length) over the limit is cut off with 413, not read whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chunked_oversized_body_is_refused_with_413() {
    let s = TestServer::start().await;
    let before = snapshot(&s).await;
    let addr = s.base.trim_start_matches("http://").to_owned();
    let mut conn = tokio::net::TcpStream::connect(&addr).await.expect("connect");
    let head = format!(
        "POST /v1/products HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n"
    );
    conn.write_all(head.as_bytes()).await.expect("head");
    let chunk = format!(r#"{{"name":"{}"#, "x".repeat(8 * 1024));
    let mut sent = 0;
    // Stop writing once the server answered and closed; 200 KiB is well over the 64 KiB limit.
    while sent < 200 * 1024 {
        let part = format!("{:x}\r\n{chunk}\r\n", chunk.len());
        if conn.write_all(part.as_bytes()).await.is_err() {
            break;
        }
        sent += chunk.len();
    }
    let _ = conn.write_all(b"0\r\n\r\n").await;
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(common::PATIENCE, conn.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains(r#""code":"payload_too_large""#), "{answer}");
    assert_eq!(snapshot(&s).await, before);
    s.stop().await;
}

/// Random bytes and mangled JSON at every route that takes a body: never a 5xx, always the
/// JSON error shape.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_never_causes_a_server_error() {
    let s = TestServer::start().await;
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let templates = [
        r#"{"name":"n","price_cents":1,"stock":1}"#,
        r#"{"buyer":"b","items":[{"product_id":"p","quantity":1}]}"#,
        r#"{"queue":"q","key":"k","delay_ms":1,"callback_url":"http://127.0.0.1:9/","payload":{"a":[1,2]}}"#,
    ];
    let tokens = ["{", "}", "[", "]", ",", ":", "\"", "null", "-1", "1e999", "\\u0000", "\u{1F600}", "true", "\"x\"", " "];
    for round in 0..300 {
        let (method, path) = [("POST", "/v1/products"), ("POST", "/v1/orders"), ("POST", "/v1/timers")][round % 3];
        let mut body: Vec<u8> = templates[round % 3].as_bytes().to_vec();
        for _ in 0..(next() % 6 + 1) {
            let pos = (next() as usize) % (body.len() + 1);
            match next() % 3 {
                0 => {
                    let t = tokens[(next() as usize) % tokens.len()];
                    body.splice(pos..pos, t.bytes());
                }
                1 if pos < body.len() => {
                    body.remove(pos);
                }
                _ => body.insert(pos, (next() % 256) as u8),
            }
        }
        let r = s
            .client
            .request(reqwest::Method::from_bytes(method.as_bytes()).expect("m"), s.url(path))
            .header("content-type", "application/json")
            .body(body.clone());
        let (st, v) = send(r).await;
        assert!(st < 500, "{method} {path} {:?} → {st} {v}", String::from_utf8_lossy(&body));
        if st >= 400 {
            assert!(v["error"]["code"].is_string(), "{st} {v}");
        }
    }
    s.stop().await;
}
