//! `overdue serve --trigger amqp` and `--backend kafka://…`: the order service with RabbitMQ
//! (`mode=dlx`) or Kafka (level topics) doing the waiting, and the errors of bad trigger input.
//!
//! The first tests start `overdue serve` as a child process on a fresh SQLite file, with
//! `--trigger amqp --trigger-url amqp://…?mode=dlx&prefix=<fresh>` (or `--backend
//! kafka://127.0.0.1:9092?prefix=<fresh>`, the same with Kafka), creates orders over HTTP with
//! a short payment timeout and pays one of them at once. The unpaid order must be closed by its
//! `order.close` timer at its deadline, and the evidence that the wake-up came through the
//! broker is: the server's `/healthz` names the `amqp-dlx` (`kafka`) trigger (the engine then runs no
//! wheel, heap or scan, only the backstop sweep), `overdue_notices_published_total` rose by at
//! least the order timers written, `overdue_backstop_rescued_total` stayed 0, and the close came
//! well within the backstop's slack (a timer must be 2 s overdue before the backstop takes it).
//! The paid order's close notice was published before the payment cancelled the timer; it
//! still arrives and is dropped by the generation fence: the paid order is never closed.
//!
//! The second test needs no broker: an unknown trigger, an amqp URL that does not parse, a
//! trigger URL together with a broker `--backend`, a backend without an outbox and a broker that
//! cannot be reached each stop `serve` with a clear message, no panic and no password printed.
//!
//! The brokers are `OVERDUE_TEST_AMQP` (default 127.0.0.1:5672, guest/guest) and
//! `OVERDUE_TEST_KAFKA` (default 127.0.0.1:9092, `scripts/brokers.sh start kafka`); without one
//! its test is skipped, and under `CI` it fails. The RabbitMQ prefix's exchanges and queues are
//! deleted at the end, pass or fail (Kafka topics stay: see crates/overdue-kafka/tests/common).
#![cfg(all(unix, feature = "rabbitmq", feature = "kafka", feature = "rocketmq"))]

mod common;

use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use reqwest::Method;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use common::{broker_reachable, free_port, fresh_kafka_url, fresh_trigger_url, kafka_reachable, server_url};

/// `--pay-timeout-secs` of the server (orders below set their own, shorter timeout).
const PAY_TIMEOUT_SECS: u64 = 30;
/// `--remind-before-secs`: the reminder comes one second before the deadline.
const REMIND_BEFORE_SECS: u64 = 1;
/// `pay_timeout_ms` of the test's orders.
const ORDER_PAY_TIMEOUT_MS: i64 = 1_500;
/// Unpaid orders created (each writes a reminder and a close timer, so two notices).
const UNPAID_ORDERS: usize = 3;
/// The close must come this soon after the deadline: the cascade's 128 ms resolution plus the
/// broker's, relay's and engine's latency on a loaded machine — and below the backstop's 2 s
/// slack, so the backstop cannot have done it.
const CLOSE_LATENESS_BOUND_MS: i64 = 1_900;
/// How long the server may take to answer `/healthz`.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long after its deadline an unpaid order may stay open before the test gives up.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(15);
/// How long after the paid order's deadline the test keeps watching that it stays paid (its
/// stale close notice arrives at the deadline, rounded up to 128 ms).
const PAID_WATCH: Duration = Duration::from_millis(1_500);
/// How long `serve` may take to exit after SIGTERM, and a failing `serve` to exit at all.
const EXIT_TIMEOUT: Duration = Duration::from_secs(20);

fn now_ms() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
}

/// Deletes the prefix's exchanges and queues when the test ends, pass or fail.
struct PurgeOnDrop {
    url: String,
}

impl Drop for PurgeOnDrop {
    fn drop(&mut self) {
        let url = self.url.clone();
        // Drop runs inside the test's runtime (or while a panic unwinds): a thread of its own.
        let result = std::thread::spawn(move || -> Result<u64, String> {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(|e| e.to_string())?;
            let trigger = overdue::rabbitmq::AmqpTrigger::from_url(&url).map_err(|e| e.to_string())?;
            rt.block_on(trigger.purge()).map_err(|e| e.to_string())
        })
        .join();
        match result {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => eprintln!("deleting the test's exchanges and queues failed: {e}"),
            Err(_) => eprintln!("deleting the test's exchanges and queues panicked"),
        }
    }
}

fn serve_command(args: &[&str], stderr: &Path) -> Command {
    let stderr = std::fs::File::create(stderr).expect("create the server's stderr file");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_overdue"));
    cmd.arg("serve")
        .args(args)
        .env_remove("OVERDUE_TOKEN")
        .env_remove("OVERDUE_WEBHOOK_URL")
        .env_remove("OVERDUE_BACKEND")
        .env_remove("OVERDUE_TRIGGER")
        .env_remove("OVERDUE_TRIGGER_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    cmd
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

async fn call(http: &reqwest::Client, method: Method, url: &str, body: Option<Value>) -> (u16, Value) {
    let mut req = http.request(method.clone(), url);
    if let Some(b) = body {
        req = req.json(&b);
    }
    let resp = req.send().await.unwrap_or_else(|e| panic!("{method} {url}: {e}"));
    let status = resp.status().as_u16();
    let text = resp.text().await.unwrap_or_else(|e| panic!("{method} {url}: reading the body: {e}"));
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// The sum of a Prometheus counter's samples (every label set), 0 when it was never touched.
async fn counter(http: &reqwest::Client, base: &str, name: &str) -> f64 {
    let text = http
        .get(format!("{base}/metrics"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .unwrap_or_else(|e| panic!("GET /metrics: {e}"))
        .text()
        .await
        .unwrap_or_else(|e| panic!("GET /metrics body: {e}"));
    text.lines()
        .filter(|l| l.split([' ', '{']).next() == Some(name))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

async fn wait_healthy(http: &reqwest::Client, base: &str, child: &mut Child, stderr: &Path) -> Value {
    let deadline = Instant::now() + STARTUP_TIMEOUT;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("overdue serve exited during startup ({status}); stderr:\n{}", read(stderr));
        }
        if let Ok(resp) = http.get(format!("{base}/healthz")).send().await
            && resp.status().is_success()
            && let Ok(body) = resp.json::<Value>().await
        {
            return body;
        }
        assert!(Instant::now() < deadline, "overdue serve did not answer /healthz within {STARTUP_TIMEOUT:?}; stderr:\n{}", read(stderr));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn closed_event(order: &Value) -> Option<&Value> {
    order["events"].as_array()?.iter().find(|e| e["kind"] == "closed")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_is_closed_by_a_notice_through_rabbitmq_and_a_paid_one_is_not() {
    let base_url = server_url();
    if !broker_reachable(&base_url) {
        return;
    }
    let dir = TempDir::new().expect("tempdir");
    let trigger_url = fresh_trigger_url(&base_url);
    let _purge = PurgeOnDrop { url: trigger_url.clone() };
    let backend = format!("sqlite:{}", dir.path().join("overdue.db").display());
    orders_close_through_the_broker(&dir, &["--backend", &backend, "--trigger", "amqp", "--trigger-url", &trigger_url], "amqp-dlx").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_is_closed_by_a_notice_through_kafka_and_a_paid_one_is_not() {
    let Some(url) = kafka_reachable().then(fresh_kafka_url) else { return };
    let dir = TempDir::new().expect("tempdir");
    // A broker URL as the backend: the default SQLite store, with its outbox, plus that trigger
    // (run from the temporary directory, so the default store lands there).
    orders_close_through_the_broker(&dir, &["--backend", &url], "kafka").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unpaid_order_is_closed_by_a_notice_through_rocketmq_and_a_paid_one_is_not() {
    if !common::rocketmq_reachable() {
        return;
    }
    let dir = TempDir::new().expect("tempdir");
    let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
    let url = format!("rocketmq://{}?prefix=ot-{ms}-{:08x}", common::rocketmq_address(), rand::random::<u32>());
    orders_close_through_the_broker(&dir, &["--backend", &url], "rocketmq-timer").await;
}

/// Starts `overdue serve` with `args` in `dir`, creates orders with a short payment timeout,
/// pays one, and checks that the others close at their deadline through the broker (trigger
/// `expect_trigger` in `/healthz`, nothing from the backstop) and the paid one never closes.
async fn orders_close_through_the_broker(dir: &TempDir, args: &[&str], expect_trigger: &str) {
    let started = Instant::now();
    let port = free_port();
    let stderr = dir.path().join("serve.stderr");
    let listen = format!("127.0.0.1:{port}");
    let mut all = vec!["--listen", &listen];
    all.extend_from_slice(args);
    let (pay, remind) = (PAY_TIMEOUT_SECS.to_string(), REMIND_BEFORE_SECS.to_string());
    all.extend_from_slice(&["--pay-timeout-secs", &pay, "--remind-before-secs", &remind]);
    let mut cmd = serve_command(&all, &stderr);
    cmd.current_dir(dir.path());
    let mut child = cmd.spawn().expect("spawn overdue serve");
    let base = format!("http://{listen}");
    let http = reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(10)).build().expect("HTTP client");
    let health = wait_healthy(&http, &base, &mut child, &stderr).await;
    assert_eq!(health["trigger"], expect_trigger, "the server runs the broker's trigger: {health}");

    let published_before = counter(&http, &base, "overdue_notices_published_total").await;
    let (status, product) = call(
        &http,
        Method::POST,
        &format!("{base}/v1/products"),
        Some(json!({"id": "tea", "name": "Oolong tea", "price_cents": 1290, "stock": 100})),
    )
    .await;
    assert_eq!(status, 201, "{product}");
    let order_body = json!({"buyer": "alice", "items": [{"product_id": "tea", "quantity": 1}], "pay_timeout_ms": ORDER_PAY_TIMEOUT_MS});
    let mut unpaid = Vec::new();
    for _ in 0..UNPAID_ORDERS {
        let (status, order) = call(&http, Method::POST, &format!("{base}/v1/orders"), Some(order_body.clone())).await;
        assert_eq!(status, 201, "{order}");
        unpaid.push(order);
    }
    let (status, paid) = call(&http, Method::POST, &format!("{base}/v1/orders"), Some(order_body.clone())).await;
    assert_eq!(status, 201, "{paid}");
    let paid_id = paid["id"].as_str().expect("order id").to_owned();
    let (status, after_pay) = call(&http, Method::POST, &format!("{base}/v1/orders/{paid_id}/pay"), None).await;
    assert_eq!((status, &after_pay["status"]), (200, &json!("paid")), "{after_pay}");

    // Each unpaid order closes at its deadline, by its order.close timer.
    let mut lateness = Vec::new();
    for order in &unpaid {
        let id = order["id"].as_str().expect("order id");
        let deadline_ms = order["pay_deadline"].as_i64().expect("pay_deadline");
        let give_up = Instant::now() + Duration::from_millis((deadline_ms - now_ms()).max(0) as u64) + CLOSE_TIMEOUT;
        let closed = loop {
            let (status, current) = call(&http, Method::GET, &format!("{base}/v1/orders/{id}"), None).await;
            assert_eq!(status, 200, "{current}");
            if current["status"] == "closed" {
                break current;
            }
            assert!(
                Instant::now() < give_up,
                "order {id} (deadline {deadline_ms}) still {} {CLOSE_TIMEOUT:?} after its deadline: {current}; stderr:\n{}",
                current["status"],
                read(&stderr)
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        assert_eq!(closed["close_reason"], "timeout", "{closed}");
        let event = closed_event(&closed).unwrap_or_else(|| panic!("no closed event: {closed}"));
        assert_eq!(event["source"], "order.close", "closed by its close timer: {closed}");
        let at = event["at"].as_i64().expect("event time");
        assert!(at >= deadline_ms, "order {id} closed {} ms before its deadline: {closed}", deadline_ms - at);
        lateness.push(at - deadline_ms);
    }

    // The paid order's close notice comes (stale) at its deadline and is dropped.
    let paid_deadline = paid["pay_deadline"].as_i64().expect("pay_deadline");
    let watch_until = paid_deadline + PAID_WATCH.as_millis() as i64;
    while now_ms() < watch_until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (status, paid_now) = call(&http, Method::GET, &format!("{base}/v1/orders/{paid_id}"), None).await;
    assert_eq!(status, 200, "{paid_now}");
    assert_eq!(paid_now["status"], "paid", "the paid order stays paid: {paid_now}");
    assert!(closed_event(&paid_now).is_none(), "the paid order has no closed event: {paid_now}");

    let published = counter(&http, &base, "overdue_notices_published_total").await - published_before;
    let rescued = counter(&http, &base, "overdue_backstop_rescued_total").await;
    let (_, health) = call(&http, Method::GET, &format!("{base}/healthz"), None).await;
    println!(
        "serve over {expect_trigger}: close lateness ms {lateness:?}; notices published {published}, backstop rescued {rescued}; \
         healthz {health}; {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let timers_written = 2 * (UNPAID_ORDERS + 1);
    assert!(
        published >= timers_written as f64,
        "the relay published {published} notices for {timers_written} order timers written; stderr:\n{}",
        read(&stderr)
    );
    assert_eq!(rescued, 0.0, "the backstop fired timers that the broker should have; stderr:\n{}", read(&stderr));
    assert!(
        lateness.iter().all(|&l| l < CLOSE_LATENESS_BOUND_MS),
        "closes later than {CLOSE_LATENESS_BOUND_MS} ms after the deadline: {lateness:?}"
    );

    // A clean stop: SIGTERM through kill(1) (the workspace denies unsafe code, so no libc::kill).
    let pid = child.id().expect("the server's pid");
    let killed = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status().expect("run kill");
    assert!(killed.success(), "kill -TERM {pid} failed");
    let status = tokio::time::timeout(EXIT_TIMEOUT, child.wait())
        .await
        .unwrap_or_else(|_| panic!("overdue serve did not stop within {EXIT_TIMEOUT:?} of SIGTERM"))
        .expect("reap the server");
    assert!(status.success(), "overdue serve stopped with {status}; stderr:\n{}", read(&stderr));
}

/// Runs `overdue serve` with `args` until it exits; returns its output and stderr.
async fn serve_fails(dir: &Path, name: &str, args: &[&str]) -> (Output, String) {
    let stderr = dir.join(format!("{name}.stderr"));
    let port = free_port().to_string();
    let mut all = vec!["--listen", &format!("127.0.0.1:{port}")].into_iter().map(str::to_owned).collect::<Vec<_>>();
    all.extend(args.iter().map(|a| (*a).to_owned()));
    let refs: Vec<&str> = all.iter().map(String::as_str).collect();
    let child = serve_command(&refs, &stderr).spawn().expect("spawn overdue serve");
    let out = tokio::time::timeout(EXIT_TIMEOUT, child.wait_with_output())
        .await
        .unwrap_or_else(|_| panic!("{name}: overdue serve {args:?} did not exit within {EXIT_TIMEOUT:?}"))
        .expect("wait for overdue serve");
    let text = read(&stderr);
    assert!(!out.status.success(), "{name}: overdue serve {args:?} should fail; stderr:\n{text}");
    assert!(!text.contains("panicked"), "{name}: a panic instead of an error:\n{text}");
    (out, text)
}

#[tokio::test]
async fn bad_trigger_input_stops_serve_with_a_clear_error() {
    let dir = TempDir::new().expect("tempdir");
    let db = format!("sqlite:{}", dir.path().join("overdue.db").display());

    let (_, e) = serve_fails(dir.path(), "unknown", &["--backend", &db, "--trigger", "pulsar"]).await;
    assert!(e.contains("unknown trigger \"pulsar\"") && e.contains("amqp") && e.contains("kafka"), "{e}");

    let (_, e) = serve_fails(dir.path(), "bad-kafka", &["--backend", "kafka://127.0.0.1:9092?partitions=0"]).await;
    assert!(e.contains("invalid kafka trigger url") && e.contains("1-1024"), "{e}");

    let (_, e) = serve_fails(dir.path(), "bad-url", &["--backend", &db, "--trigger", "amqp", "--trigger-url", "amqp://u:hunter2@127.0.0.1/%2f?mode=fast"]).await;
    assert!(e.contains("invalid amqp trigger url") && e.contains("expected dlx or delayed"), "{e}");
    assert!(!e.contains("hunter2"), "the password is printed: {e}");

    let (_, e) = serve_fails(dir.path(), "not-amqp", &["--backend", &db, "--trigger", "amqp", "--trigger-url", "http://127.0.0.1:5672"]).await;
    assert!(e.contains("does not start with amqp://"), "{e}");

    let (_, e) = serve_fails(
        dir.path(),
        "both",
        &["--backend", "amqp://guest:guest@127.0.0.1:5672/%2f", "--trigger-url", "amqp://guest:guest@127.0.0.1:5672/%2f"],
    )
    .await;
    assert!(e.contains("names the trigger's broker already"), "{e}");

    let (_, e) = serve_fails(dir.path(), "in-process", &["--backend", &db, "--trigger", "heap", "--trigger-url", "amqp://127.0.0.1"]).await;
    assert!(e.contains("--trigger-url is for an external trigger"), "{e}");

    let (_, e) = serve_fails(
        dir.path(),
        "no-outbox",
        &["--backend", "redis://127.0.0.1:6379", "--trigger", "amqp", "--trigger-url", "amqp://guest:guest@127.0.0.1:5672/%2f"],
    )
    .await;
    assert!(e.contains("needs the timers in a SQL store") && e.contains("has no outbox"), "{e}");

    // Nothing listens on port 1 of the loopback address: refused at once.
    let (_, e) = serve_fails(
        dir.path(),
        "unreachable",
        &["--backend", &db, "--trigger", "amqp", "--trigger-url", "amqp://guest:hunter2@127.0.0.1:1/%2f?mode=dlx"],
    )
    .await;
    assert!(e.contains("cannot connect to rabbitmq at amqp://guest:***@127.0.0.1:1"), "{e}");
    assert!(!e.contains("hunter2"), "the password is printed: {e}");
}
