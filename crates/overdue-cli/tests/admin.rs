//! The admin subcommands (`overdue orders|timers|dead-letters …`) against a real `overdue serve`:
//! what they print, their exit codes, and that a reader closing the pipe early
//! (`overdue orders list | head`) ends the command quietly instead of panicking.

mod common;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::free_port;

const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

struct Server {
    child: std::process::Child,
    base: String,
    dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start() -> Server {
    let dir = tempfile::tempdir().expect("temp dir");
    let port = free_port();
    let stderr = std::fs::File::create(dir.path().join("serve.stderr")).expect("create the server's stderr file");
    let child = Command::new(env!("CARGO_BIN_EXE_overdue"))
        .current_dir(dir.path())
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--backend", "sqlite:overdue-data/overdue.db"])
        .args(["--pay-timeout-secs", "1800", "--remind-before-secs", "300"])
        .env_remove("OVERDUE_TOKEN")
        .env_remove("OVERDUE_WEBHOOK_URL")
        .env_remove("OVERDUE_ORDERS")
        .env_remove("OVERDUE_TRIGGER")
        .env_remove("OVERDUE_TRIGGER_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .expect("spawn overdue serve");
    let mut server = Server { child, base: format!("http://127.0.0.1:{port}"), dir };
    let http = reqwest::Client::builder().no_proxy().timeout(REQUEST_TIMEOUT).build().expect("HTTP client");
    let started = Instant::now();
    loop {
        if let Some(status) = server.child.try_wait().expect("poll the server") {
            let log = std::fs::read_to_string(server.dir.path().join("serve.stderr")).unwrap_or_default();
            panic!("the server exited before answering /healthz ({status}):\n{log}");
        }
        if let Ok(r) = http.get(format!("{}/healthz", server.base)).send().await
            && r.status() == 200
        {
            return server;
        }
        assert!(started.elapsed() < STARTUP_TIMEOUT, "the server did not answer /healthz within {STARTUP_TIMEOUT:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn post(server: &Server, path: &str, body: Value) -> Value {
    let http = reqwest::Client::builder().no_proxy().timeout(REQUEST_TIMEOUT).build().expect("HTTP client");
    let r = http.post(format!("{}{path}", server.base)).json(&body).send().await.expect("POST");
    assert!(r.status().is_success(), "POST {path}: {}", r.status());
    r.json().await.expect("JSON answer")
}

/// Runs `overdue <args>` with `OVERDUE_SERVER=<base>` and its output captured.
fn admin(server: &Server, args: &[&str]) -> Output {
    admin_to(server, args, Stdio::piped())
}

fn admin_to(server: &Server, args: &[&str], stdout: Stdio) -> Output {
    Command::new(env!("CARGO_BIN_EXE_overdue"))
        .args(args)
        .env("OVERDUE_SERVER", &server.base)
        .env_remove("OVERDUE_TOKEN")
        .env("NO_PROXY", "127.0.0.1")
        .env("no_proxy", "127.0.0.1")
        .stdout(stdout)
        .stderr(Stdio::piped())
        .output()
        .expect("run the admin command")
}

fn json_out(o: &Output, what: &str) -> Value {
    assert!(o.status.success(), "{what}: {} stderr:\n{}", o.status, String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{what}: stdout is not JSON ({e}):\n{}", String::from_utf8_lossy(&o.stdout)))
}

#[tokio::test]
async fn admin_commands_print_what_the_api_answers_and_fail_with_its_error_code() {
    let server = start().await;
    post(&server, "/v1/products", json!({"id": "tea", "name": "Oolong", "price_cents": 1290, "stock": 10})).await;
    let order = post(&server, "/v1/orders", json!({"buyer": "alice", "items": [{"product_id": "tea", "quantity": 2}]})).await;
    let id = order["id"].as_str().expect("order id");

    let got = json_out(&admin(&server, &["orders", "get", id]), "orders get");
    assert_eq!(got["id"], id);
    assert_eq!(got["status"], "pending_payment");
    let queues: Vec<&str> = got["timers"].as_array().expect("timers").iter().filter_map(|t| t["queue"].as_str()).collect();
    assert_eq!(queues, ["order.remind", "order.close"], "the order's pending timers, in due order");

    let listed = json_out(&admin(&server, &["orders", "list", "--status", "pending_payment"]), "orders list");
    let ids: Vec<&str> = listed["orders"].as_array().expect("orders").iter().filter_map(|o| o["id"].as_str()).collect();
    assert_eq!(ids, [id]);
    let none = json_out(&admin(&server, &["orders", "list", "--status", "paid"]), "orders list --status paid");
    assert_eq!(none["orders"].as_array().map(Vec::len), Some(0));

    let closes = json_out(&admin(&server, &["timers", "list", "--queue", "order.close"]), "timers list");
    let keys: Vec<&str> = closes["timers"].as_array().expect("timers").iter().filter_map(|t| t["key"].as_str()).collect();
    assert_eq!(keys, [id]);

    // A generic timer, an hour away: shown, then cancelled, then gone.
    post(&server, "/v1/timers", json!({"queue": "admin.test", "key": "k1", "delay_ms": 3_600_000, "callback_url": "http://127.0.0.1:9/hook", "payload": {}})).await;
    let t = json_out(&admin(&server, &["timers", "get", "admin.test", "k1"]), "timers get");
    assert_eq!((t["queue"].as_str(), t["key"].as_str()), (Some("admin.test"), Some("k1")));
    json_out(&admin(&server, &["timers", "cancel", "admin.test", "k1"]), "timers cancel");
    let gone = admin(&server, &["timers", "get", "admin.test", "k1"]);
    assert!(!gone.status.success(), "a cancelled timer is not found");
    assert!(String::from_utf8_lossy(&gone.stderr).contains("not_found"), "stderr: {}", String::from_utf8_lossy(&gone.stderr));

    let dead = json_out(&admin(&server, &["dead-letters", "list"]), "dead-letters list");
    assert_eq!(dead["dead_letters"].as_array().map(Vec::len), Some(0));

    // Errors: the API's code on stderr, a failing exit status, nothing on stdout.
    let missing = admin(&server, &["orders", "get", "o-nope"]);
    assert!(!missing.status.success());
    assert!(missing.stdout.is_empty());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("404 Not Found: not_found"), "stderr: {}", String::from_utf8_lossy(&missing.stderr));
    let refused = admin(&server, &["timers", "fire-now", "order.close", id]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("invalid_input"), "stderr: {}", String::from_utf8_lossy(&refused.stderr));
    let after = json_out(&admin(&server, &["orders", "get", id]), "orders get after the refusals");
    assert_eq!(after["status"], "pending_payment", "a refused command changed nothing");
}

#[tokio::test]
async fn a_reader_that_closed_the_pipe_ends_the_command_quietly() {
    let server = start().await;
    post(&server, "/v1/products", json!({"id": "tea", "name": "Oolong", "price_cents": 1290, "stock": 10})).await;
    post(&server, "/v1/orders", json!({"buyer": "alice", "items": [{"product_id": "tea", "quantity": 1}]})).await;

    // A pipe whose read end is closed before the command runs: its first write fails with EPIPE,
    // as `overdue orders list | head -1` does once head has exited.
    let (read_end, write_end) = std::io::pipe().expect("pipe(2)");
    drop(read_end);
    let out = admin_to(&server, &["orders", "list"], Stdio::from(write_end));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}; stderr:\n{stderr}", out.status);
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
}
