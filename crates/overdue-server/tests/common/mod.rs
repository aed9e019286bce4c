//! A test server on 127.0.0.1:0 over a fresh SQLite file, driven by a manual clock, and a tiny
//! callback receiver.

#![allow(dead_code)]

use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use overdue::ManualClock;
use overdue_server::{App, AppConfig, serve};
#[allow(unused_imports)]
pub use overdue_testkit::every_backend;
pub use overdue_testkit::servers::Db;
use serde_json::Value;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Where the manual clock starts: 2023-11-14T22:13:20Z.
pub const T0: i64 = 1_700_000_000_000;
/// Longest a test waits for something that already happened on another task.
pub const PATIENCE: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub app: App,
    pub base: String,
    pub client: reqwest::Client,
    pub clock: ManualClock,
    pub token: Option<String>,
    shutdown: Option<oneshot::Sender<()>>,
    server: Option<JoinHandle<std::io::Result<()>>>,
    _dir: tempfile::TempDir,
}

impl TestServer {
    pub async fn start() -> TestServer {
        TestServer::start_with(|_| {}).await
    }

    /// A server whose orders and timers live in `db` (a fresh schema or database on a server);
    /// `None` when that server is unreachable outside CI (under `CI` the helper panics).
    pub async fn start_on(db: Db) -> Option<TestServer> {
        let url = match db {
            Db::Sqlite => None,
            Db::Postgres => Some(overdue_testkit::servers::postgres::fresh_url("").await?),
            Db::Mysql => Some(overdue_testkit::servers::mysql::fresh_url("").await?),
            Db::Redis => Some(overdue_testkit::servers::redis::fresh_url().await?),
        };
        Some(TestServer::start_with(move |cfg| {
            if let Some(url) = url {
                if db == Db::Redis {
                    // Orders in SQLite beside the default file, timers in Redis.
                    cfg.orders_url = Some(cfg.backend_url.replace("overdue.db", "orders.db"));
                }
                cfg.backend_url = url;
            }
        })
        .await)
    }

    pub async fn start_with(configure: impl FnOnce(&mut AppConfig)) -> TestServer {
        let dir = tempfile::tempdir().expect("tempdir");
        let clock = ManualClock::new(T0);
        let mut cfg = AppConfig {
            backend_url: format!("sqlite:{}?durability=buffer", dir.path().join("overdue.db").display()),
            clock: Arc::new(clock.clone()),
            ..AppConfig::default()
        };
        configure(&mut cfg);
        let token = cfg.token.clone();
        let app = App::start(cfg).await.expect("app starts");
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let base = format!("http://{}", listener.local_addr().expect("addr"));
        let (tx, rx) = oneshot::channel::<()>();
        let server = tokio::spawn(serve(listener, app.router(), async move {
            let _ = rx.await;
        }));
        let client = reqwest::Client::builder().timeout(PATIENCE).build().expect("client");
        TestServer { app, base, client, clock, token, shutdown: Some(tx), server: Some(server), _dir: dir }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    /// A request with the token (if the server has one).
    pub fn req(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let r = self.client.request(method, self.url(path));
        match &self.token {
            Some(t) => r.bearer_auth(t),
            None => r,
        }
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::GET, path)).await
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        send(self.req(reqwest::Method::POST, path).json(&body)).await
    }

    /// POST without a body (the order transitions).
    pub async fn post_empty(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::POST, path)).await
    }

    pub async fn delete(&self, path: &str) -> (u16, Value) {
        send(self.req(reqwest::Method::DELETE, path)).await
    }

    /// Moves virtual time and lets the engine fire and settle everything now due.
    pub async fn advance(&self, ms: i64) {
        // With the timers in Redis, what the last requests changed is relayed first, and what
        // the firings changed after each round (a no-op elsewhere).
        self.app.orders.flush_timers().await.expect("relay timers");
        self.clock.advance(ms);
        loop {
            self.app.engine.settle().await;
            if self.app.orders.flush_timers().await.expect("relay timers") == 0 {
                break;
            }
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(s) = self.server.take() {
            tokio::time::timeout(PATIENCE, s).await.expect("server stops").expect("join").expect("serve");
        }
        let report = self.app.shutdown().await;
        assert!(report.drained, "{report:?}");
    }
}

/// Sends and decodes a JSON answer (or `Value::String` with the raw text if it is not JSON).
pub async fn send(r: reqwest::RequestBuilder) -> (u16, Value) {
    let resp = r.send().await.expect("request reaches the server");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// Asserts an error answer: status, code, and the JSON error shape.
#[track_caller]
pub fn assert_error(got: &(u16, Value), status: u16, code: &str) {
    assert_eq!(got.0, status, "expected {status} {code}, got {got:?}");
    assert_eq!(got.1["error"]["code"], code, "expected {status} {code}, got {got:?}");
    assert!(got.1["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "error without a message: {got:?}");
}

/// One request a receiver got.
#[derive(Debug, Clone)]
pub struct Received {
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// An HTTP receiver on 127.0.0.1:0 that records every POST and answers with `status`.
pub struct Receiver {
    pub url: String,
    pub status: Arc<AtomicU16>,
    pub rx: mpsc::UnboundedReceiver<Received>,
    task: JoinHandle<()>,
}

#[derive(Clone)]
struct RecvState {
    tx: mpsc::UnboundedSender<Received>,
    status: Arc<AtomicU16>,
}

async fn record(State(st): State<RecvState>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let _ = st.tx.send(Received { headers, body });
    StatusCode::from_u16(st.status.load(Ordering::SeqCst)).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

impl Receiver {
    pub async fn start(path: &str) -> Receiver {
        let (tx, rx) = mpsc::unbounded_channel();
        let status = Arc::new(AtomicU16::new(200));
        let router = axum::Router::new()
            .route(path, axum::routing::post(record))
            .with_state(RecvState { tx, status: status.clone() });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind receiver");
        let url = format!("http://{}{}", listener.local_addr().expect("addr"), path);
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, router).await;
        });
        Receiver { url, status, rx, task }
    }

    pub fn answer(&self, status: u16) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// The next recorded request; the request must already have been made (or be underway).
    pub async fn next(&mut self) -> Received {
        tokio::time::timeout(PATIENCE, self.rx.recv()).await.expect("a request within the patience").expect("receiver alive")
    }

    /// Everything recorded so far, without waiting.
    pub fn drain(&mut self) -> Vec<Received> {
        let mut v = Vec::new();
        while let Ok(r) = self.rx.try_recv() {
            v.push(r);
        }
        v
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

pub fn header<'a>(r: &'a Received, name: &str) -> &'a str {
    r.headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_else(|| panic!("header {name} missing in {:?}", r.headers))
}
