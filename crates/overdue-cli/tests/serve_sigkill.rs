//! `kill -9` on `overdue serve` in the middle of a load of orders, a few times over on one
//! database: every order the API acknowledged exists afterwards, every acknowledged payment
//! stuck, and the order invariant holds.
//!
//! Each round starts `overdue serve` as a child process on the same SQLite file (a new loopback
//! port each time), waits for `GET /healthz`, and lets [`CLIENTS`] concurrent HTTP clients
//! create orders (`POST /v1/orders`) and act on them: pay the order just created
//! ([`PAY_NOW_SHARE`]), or pay ([`PAY_LATER_SHARE`]) or cancel ([`CANCEL_SHARE`]) an earlier
//! acknowledged order that nobody acted on yet, possibly from an earlier round, close to or past
//! its deadline. Payment timeouts are short ([`PAY_TIMEOUT_SECS`], and the minimum of one second
//! for [`SHORT_TIMEOUT_SHARE`] of the orders) so the close timers race with the payments, and
//! one product has little stock so some orders are refused `409 out_of_stock` and closed orders
//! give stock back. After a random [`KILL_AFTER_MS`] the test sends SIGKILL (tokio's
//! `Child::start_kill`, `kill(pid, SIGKILL)` on Unix) while the clients are still running; they
//! then see connection errors and stop. A request whose answer did not arrive in full counts as
//! unanswered: its effect may or may not have happened.
//!
//! After [`ROUNDS`] killed rounds a last server runs without load until every deadline has
//! passed, no order is `pending_payment` and no order timer is left, and is stopped with
//! SIGTERM. The test then opens the database in-process (`OrderService::open`; the process lock
//! is free once the child is gone) and checks:
//!
//! - **invariant**: `check_invariants(INVARIANT_BOUND_MS)` is clean — stock conserved, no paid
//!   order closed, no unpaid order overdue, every status consistent with its events;
//! - **no lost order**: every acknowledged order (`201`) exists, with the lines and total it was
//!   acknowledged with;
//! - **no lost payment**: every acknowledged payment (`200`) left its order `paid`, with a
//!   `paid` event and no `closed` one;
//! - **refusals meant it**: an order whose payment was refused `409 order_closed`, whose cancel
//!   was acknowledged, or whose cancel was refused because it was already closed, is `closed`
//!   (`buyer_cancel` for an acknowledged cancel);
//! - **settled**: every order is `paid` or `closed`; no order timer or dead letter is left;
//! - **stock by hand**: each product's `stock_total` is what it was created with, and
//!   `stock_total - stock` is the quantity held by paid orders;
//! - and that nothing unexpected happened on the way: no HTTP status outside the ones listed
//!   above, no connection error before the kill, no server that died by itself.
//!
//! The kill moments and the clients' choices come from a seeded RNG; the seed is printed and can
//! be replayed (timing aside) with
//! `OVERDUE_SERVE_CRASH_SEED=<seed> cargo test -p overdue-cli --test serve_sigkill -- --nocapture`.
#![cfg(unix)]

mod common;

use std::collections::BTreeMap;
use std::fs::File;
use std::ops::RangeInclusive;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use overdue::{Clock, SystemClock};
use overdue_orders::{
    CLOSE_BUYER_CANCEL, CLOSE_TIMEOUT, Order, OrderConfig, OrderQuery, OrderService, OrderStatus, Q_CLOSE, Q_REMIND,
};
use overdue_sql::{SqliteOptions, SqliteStore};
use parking_lot::Mutex;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use reqwest::Method;
use serde_json::{Value, json};
use tempfile::TempDir;
use tokio::process::{Child, Command};
use tokio::task::JoinHandle;

use common::free_port;

/// Environment variable that fixes the RNG seed, to replay a failing run.
const SEED_ENV: &str = "OVERDUE_SERVE_CRASH_SEED";
/// Kill-and-restart rounds under load.
const ROUNDS: usize = 3;
/// Concurrent HTTP clients per round.
const CLIENTS: usize = 16;
/// The server is killed this many milliseconds after the load began.
const KILL_AFTER_MS: RangeInclusive<u64> = 300..=1_500;
/// `--pay-timeout-secs` of the server: the default payment deadline of an order.
const PAY_TIMEOUT_SECS: u64 = 2;
/// `--remind-before-secs` of the server: the reminder fires one second before the deadline.
const REMIND_BEFORE_SECS: u64 = 1;
/// Share of orders created with `pay_timeout_ms` = [`SHORT_PAY_TIMEOUT_MS`] (the shortest the
/// server allows), so deadlines pass while the load runs.
const SHORT_TIMEOUT_SHARE: f64 = 0.25;
/// `pay_timeout_ms` of those orders.
const SHORT_PAY_TIMEOUT_MS: i64 = 1_000;
/// Share of acknowledged orders paid at once by the client that created them.
const PAY_NOW_SHARE: f64 = 0.5;
/// Share of client iterations that pay an earlier, not yet acted-on order instead of creating one.
const PAY_LATER_SHARE: f64 = 0.15;
/// Share of client iterations that cancel an earlier, not yet acted-on order.
const CANCEL_SHARE: f64 = 0.05;
/// Share of orders with a second line.
const TWO_LINES_SHARE: f64 = 0.3;
/// Most units of one product in an order line.
const MAX_LINE_QUANTITY: i64 = 3;
/// `(id, price_cents, stock, weight)`: the products; `rare` runs out, so some orders get
/// `409 out_of_stock` and stock released by closed orders is reserved again.
const PRODUCTS: [(&str, i64, i64, u32); 3] =
    [("tea", 1_250, 1_000_000, 45), ("cup", 800, 100_000, 45), ("rare", 99_000, 6, 10)];
/// Attempts to start a server when the free port we picked was taken in between.
const START_ATTEMPTS: usize = 3;
/// How long a server may take to answer `/healthz` after it was spawned.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);
/// Pause between two `/healthz` probes, and between two polls while draining.
const POLL_INTERVAL: Duration = Duration::from_millis(50);
/// Timeout of one HTTP request of the load (a hung server shows as errors before the kill only
/// if it hangs longer than the round; the final phase has its own bounds).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a SIGKILLed server may take to be reaped.
const REAP_TIMEOUT: Duration = Duration::from_secs(10);
/// How long the clients may take to notice the server is gone and stop.
const CLIENT_STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// How long the last server may take, after the last acknowledged deadline, to close every
/// unpaid order and finish every order timer. Real deadlines of a real server: polling is fine.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the last server may take to exit after SIGTERM (its shutdown grace is 10 s).
const STOP_TIMEOUT: Duration = Duration::from_secs(20);
/// `bound_ms` of the invariant check: no unpaid order may be this far past its deadline.
const INVARIANT_BOUND_MS: i64 = 5_000;
/// Lines of each server's stderr shown in a failure message.
const STDERR_TAIL_LINES: usize = 60;
/// Entries of a list of findings shown in a failure message.
const SHOWN_FINDINGS: usize = 20;

/// An order the API acknowledged with `201`.
#[derive(Debug, Clone)]
struct AckedOrder {
    round: usize,
    pay_deadline: i64,
    total_cents: i64,
    /// `(product_id, quantity)` as acknowledged.
    lines: Vec<(String, i64)>,
}

/// What one killed round did.
#[derive(Debug, Default, Clone)]
struct RoundStats {
    port: u16,
    kill_after_ms: u64,
    startup_ms: u128,
    orders_acked: usize,
    out_of_stock: usize,
    payments_acked: usize,
    pay_refused_closed: usize,
    cancels_acked: usize,
    cancel_refused_closed: usize,
    /// Requests that got no complete answer because the server was killed, by kind.
    creates_unanswered: usize,
    pays_unanswered: usize,
    cancels_unanswered: usize,
    /// Slowest complete answer of the round.
    max_latency_ms: u128,
}

/// Everything the clients were told, across rounds.
#[derive(Debug, Default)]
struct Ledger {
    orders: BTreeMap<String, AckedOrder>,
    /// Order id → round of the `200` on pay.
    paid: BTreeMap<String, usize>,
    /// Order id → round of the `409 order_closed` on pay.
    pay_refused_closed: BTreeMap<String, usize>,
    /// Order id → round of the `200` on cancel.
    cancelled: BTreeMap<String, usize>,
    /// Order id → round of the `409 illegal_transition` (status `closed`) on cancel.
    cancel_refused_closed: BTreeMap<String, usize>,
    /// Acknowledged orders nobody has paid or cancelled yet (each order gets one action at most).
    untouched: Vec<String>,
    /// Anything the test did not expect; fails the test.
    unexpected: Vec<String>,
    rounds: Vec<RoundStats>,
}

/// What the clients of one round share.
#[derive(Debug)]
struct Load {
    http: reqwest::Client,
    base: String,
    round: usize,
    /// Set just before the SIGKILL: from then on a connection error is expected.
    killed: AtomicBool,
    ledger: Arc<Mutex<Ledger>>,
}

/// A complete HTTP answer: status, JSON body (or the text as a JSON string), latency.
#[derive(Debug)]
struct Answer {
    status: u16,
    body: Value,
    took: Duration,
}

/// A running `overdue serve`.
#[derive(Debug)]
struct Server {
    child: Child,
    base: String,
    port: u16,
    label: String,
    stderr: PathBuf,
    startup: Duration,
}

fn seed() -> u64 {
    match std::env::var(SEED_ENV) {
        Ok(s) => s.trim().parse().unwrap_or_else(|e| panic!("{SEED_ENV}={s:?} is not a u64: {e}")),
        Err(_) => rand::random(),
    }
}

fn now_ms() -> i64 {
    SystemClock.now_ms()
}

/// An error with its chain of sources, on one line.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        s.push_str(": ");
        s.push_str(&cause.to_string());
        source = cause.source();
    }
    s
}

/// The first [`SHOWN_FINDINGS`] entries of `list`, one a line, and how many more there are.
fn findings(list: &[String]) -> String {
    let mut out: String = list.iter().take(SHOWN_FINDINGS).map(|f| format!("  {f}\n")).collect();
    if list.len() > SHOWN_FINDINGS {
        out.push_str(&format!("  … and {} more\n", list.len() - SHOWN_FINDINGS));
    }
    out
}

fn read_file(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| format!("<cannot read {}: {e}>", path.display()))
}

/// The last lines of every server's stderr in `dir`, oldest server first.
fn server_logs(dir: &Path) -> String {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| rd.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|x| x == "stderr"));
    files.sort_by_key(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok());
    let mut out = String::new();
    for f in files {
        let text = read_file(&f);
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(STDERR_TAIL_LINES);
        out.push_str(&format!("--- {} ({} lines, last {}) ---\n", f.display(), lines.len(), lines.len() - from));
        for l in &lines[from..] {
            out.push_str(l);
            out.push('\n');
        }
    }
    out
}

fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .timeout(REQUEST_TIMEOUT)
        .build()
        .expect("build the HTTP client")
}

async fn call(http: &reqwest::Client, method: Method, url: &str, body: Option<&Value>) -> Result<Answer, String> {
    let started = Instant::now();
    let mut req = http.request(method, url);
    if let Some(b) = body {
        req = req.json(b);
    }
    let resp = req.send().await.map_err(|e| chain(&e))?;
    let status = resp.status().as_u16();
    // An answer counts only once its body arrived in full.
    let bytes = resp.bytes().await.map_err(|e| format!("status {status}, body cut short: {}", chain(&e)))?;
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
    };
    Ok(Answer { status, body, took: started.elapsed() })
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

async fn start_server(dir: &Path, backend: &str, label: &str) -> Server {
    for attempt in 1..=START_ATTEMPTS {
        let port = free_port();
        let name = if attempt == 1 { label.to_owned() } else { format!("{label}-attempt{attempt}") };
        let stderr_path = dir.join(format!("serve-{name}.stderr"));
        let stdout_path = dir.join(format!("serve-{name}.stdout"));
        let stderr = File::create(&stderr_path).expect("create the server's stderr file");
        let stdout = File::create(&stdout_path).expect("create the server's stdout file");
        let spawned = Instant::now();
        let mut child = Command::new(env!("CARGO_BIN_EXE_overdue"))
            .arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}"), "--backend", backend])
            .args(["--pay-timeout-secs", &PAY_TIMEOUT_SECS.to_string()])
            .args(["--remind-before-secs", &REMIND_BEFORE_SECS.to_string()])
            .env_remove("OVERDUE_TOKEN")
            .env_remove("OVERDUE_WEBHOOK_URL")
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .kill_on_drop(true)
            .spawn()
            .expect("spawn overdue serve");
        let base = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(3))
            .build()
            .expect("build the health-check client");
        let deadline = spawned + STARTUP_TIMEOUT;
        loop {
            if let Some(status) = child.try_wait().expect("poll the server process") {
                let log = read_file(&stderr_path);
                if attempt < START_ATTEMPTS && log.contains("cannot listen") {
                    println!("{label}: port {port} was taken, retrying on another ({status})");
                    break;
                }
                panic!("{label}: the server exited before answering /healthz ({status}); stderr:\n{log}");
            }
            let last = match call(&http, Method::GET, &format!("{base}/healthz"), None).await {
                Ok(a) if a.status == 200 => {
                    return Server {
                        child,
                        base,
                        port,
                        label: label.to_owned(),
                        stderr: stderr_path,
                        startup: spawned.elapsed(),
                    };
                }
                Ok(a) => format!("status {}: {}", a.status, a.body),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                let _ = child.start_kill();
                panic!(
                    "{label}: the server did not answer /healthz within {STARTUP_TIMEOUT:?} (last: {last}); stderr:\n{}",
                    read_file(&stderr_path)
                );
            }
            tokio::time::sleep(POLL_INTERVAL).await;
        }
    }
    panic!("{label}: could not find a free port in {START_ATTEMPTS} attempts");
}

impl Server {
    /// SIGKILL, reap, and check the server did not end by itself before.
    async fn sigkill(&mut self) -> ExitStatus {
        if let Some(status) = self.child.try_wait().expect("poll the server process") {
            panic!(
                "{}: the server ended by itself before the kill ({status}); stderr:\n{}",
                self.label,
                read_file(&self.stderr)
            );
        }
        self.child.start_kill().expect("SIGKILL the server");
        let status = tokio::time::timeout(REAP_TIMEOUT, self.child.wait())
            .await
            .unwrap_or_else(|_| panic!("{}: the killed server was not reaped within {REAP_TIMEOUT:?}", self.label))
            .expect("reap the server");
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{}: the server ended by itself, not by the kill ({status}); stderr:\n{}",
            self.label,
            read_file(&self.stderr)
        );
        status
    }

    /// SIGTERM (through kill(1): the workspace denies unsafe code), then wait for a clean exit.
    async fn sigterm(&mut self) -> ExitStatus {
        let pid = self.child.id().expect("the server is still running, so it has a pid");
        let kill = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await
            .expect("run kill -TERM");
        assert!(kill.success(), "kill -TERM {pid} failed: {kill}");
        match tokio::time::timeout(STOP_TIMEOUT, self.child.wait()).await {
            Ok(status) => status.expect("reap the server"),
            Err(_) => {
                let _ = self.child.start_kill();
                panic!(
                    "{}: the server did not stop within {STOP_TIMEOUT:?} of SIGTERM (a hang in shutdown); stderr:\n{}",
                    self.label,
                    read_file(&self.stderr)
                );
            }
        }
    }
}

async fn create_products(server: &Server) {
    let http = http_client();
    for (id, price_cents, stock, _) in PRODUCTS {
        let body = json!({"id": id, "name": format!("product {id}"), "price_cents": price_cents, "stock": stock});
        let a = call(&http, Method::POST, &format!("{}/v1/products", server.base), Some(&body))
            .await
            .unwrap_or_else(|e| panic!("create product {id}: {e}"));
        assert_eq!(a.status, 201, "create product {id}: {}", a.body);
        assert_eq!(
            (a.body["stock"].as_i64(), a.body["stock_total"].as_i64()),
            (Some(stock), Some(stock)),
            "product {id} as created: {}",
            a.body
        );
    }
}

fn pick_product(rng: &mut StdRng, except: Option<usize>) -> usize {
    loop {
        let total: u32 = PRODUCTS.iter().map(|p| p.3).sum();
        let mut x = rng.random_range(0..total);
        let mut i = 0;
        while x >= PRODUCTS[i].3 {
            x -= PRODUCTS[i].3;
            i += 1;
        }
        if Some(i) != except {
            return i;
        }
    }
}

fn new_order_body(rng: &mut StdRng, client: usize) -> (Value, Vec<(String, i64)>) {
    let first = pick_product(rng, None);
    let mut picked = vec![first];
    if rng.random_bool(TWO_LINES_SHARE) {
        picked.push(pick_product(rng, Some(first)));
    }
    let lines: Vec<(String, i64)> =
        picked.iter().map(|&i| (PRODUCTS[i].0.to_owned(), rng.random_range(1..=MAX_LINE_QUANTITY))).collect();
    let items: Vec<Value> = lines.iter().map(|(p, q)| json!({"product_id": p, "quantity": q})).collect();
    let mut body = json!({"buyer": format!("buyer-{client}"), "items": items});
    if rng.random_bool(SHORT_TIMEOUT_SHARE) {
        body["pay_timeout_ms"] = json!(SHORT_PAY_TIMEOUT_MS);
    }
    (body, lines)
}

/// What a client does with an earlier order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Act {
    Pay,
    Cancel,
}

/// Records a request that got no complete answer; tells the client to stop. Before the kill it
/// is unexpected.
fn unanswered(load: &Load, what: &str, error: &str, count: impl FnOnce(&mut RoundStats)) -> bool {
    let mut l = load.ledger.lock();
    if load.killed.load(Ordering::SeqCst) {
        count(&mut l.rounds[load.round]);
    } else {
        l.unexpected.push(format!("round {}: {what}: no answer before the kill: {error}", load.round));
    }
    false
}

fn note_latency(load: &Load, a: &Answer) {
    let mut l = load.ledger.lock();
    let r = &mut l.rounds[load.round];
    r.max_latency_ms = r.max_latency_ms.max(a.took.as_millis());
}

/// Pays or cancels `id`; false when the client should stop.
async fn act(load: &Load, id: &str, act: Act) -> bool {
    let verb = match act {
        Act::Pay => "pay",
        Act::Cancel => "cancel",
    };
    let url = format!("{}/v1/orders/{id}/{verb}", load.base);
    let a = match call(&load.http, Method::POST, &url, None).await {
        Ok(a) => a,
        Err(e) => {
            return unanswered(load, &format!("{verb} {id}"), &e, |r| match act {
                Act::Pay => r.pays_unanswered += 1,
                Act::Cancel => r.cancels_unanswered += 1,
            });
        }
    };
    note_latency(load, &a);
    let round = load.round;
    let mut l = load.ledger.lock();
    match (act, a.status, error_code(&a.body)) {
        (Act::Pay, 200, _) if a.body["status"] == "paid" => {
            l.paid.insert(id.to_owned(), round);
            l.rounds[round].payments_acked += 1;
        }
        (Act::Pay, 409, "order_closed") => {
            l.pay_refused_closed.insert(id.to_owned(), round);
            l.rounds[round].pay_refused_closed += 1;
        }
        (Act::Cancel, 200, _) if a.body["status"] == "closed" && a.body["close_reason"] == CLOSE_BUYER_CANCEL => {
            l.cancelled.insert(id.to_owned(), round);
            l.rounds[round].cancels_acked += 1;
        }
        (Act::Cancel, 409, "illegal_transition") if a.body["error"]["status"] == "closed" => {
            l.cancel_refused_closed.insert(id.to_owned(), round);
            l.rounds[round].cancel_refused_closed += 1;
        }
        (_, 404, _) => {
            let acked = l.orders.get(id).cloned();
            l.unexpected.push(format!(
                "round {round}: {verb} {id}: 404, but the order was acknowledged ({acked:?}): {}",
                a.body
            ));
        }
        (_, status, _) => {
            l.unexpected.push(format!("round {round}: {verb} {id}: unexpected answer {status}: {}", a.body));
        }
    }
    true
}

/// Creates one order, and perhaps pays it at once; false when the client should stop.
async fn create(load: &Load, rng: &mut StdRng, client: usize) -> bool {
    let (body, lines) = new_order_body(rng, client);
    let a = match call(&load.http, Method::POST, &format!("{}/v1/orders", load.base), Some(&body)).await {
        Ok(a) => a,
        Err(e) => return unanswered(load, &format!("create {body}"), &e, |r| r.creates_unanswered += 1),
    };
    note_latency(load, &a);
    let round = load.round;
    let id = match (a.status, error_code(&a.body)) {
        (201, _) => match serde_json::from_value::<Order>(a.body.clone()) {
            Ok(order) if order.status == OrderStatus::PendingPayment => {
                let mut l = load.ledger.lock();
                let acked = AckedOrder {
                    round,
                    pay_deadline: order.pay_deadline,
                    total_cents: order.total_cents,
                    lines: lines.clone(),
                };
                if let Some(previous) = l.orders.insert(order.id.clone(), acked) {
                    l.unexpected.push(format!("round {round}: order id {} acknowledged twice (first {previous:?})", order.id));
                }
                l.rounds[round].orders_acked += 1;
                order.id
            }
            Ok(order) => {
                load.ledger.lock().unexpected.push(format!("round {round}: a new order is not pending_payment: {order:?}"));
                return true;
            }
            Err(e) => {
                load.ledger.lock().unexpected.push(format!("round {round}: 201 with a body that is no order ({e}): {}", a.body));
                return true;
            }
        },
        (409, "out_of_stock") => {
            load.ledger.lock().rounds[round].out_of_stock += 1;
            return true;
        }
        (status, _) => {
            load.ledger.lock().unexpected.push(format!("round {round}: create {body}: unexpected answer {status}: {}", a.body));
            return true;
        }
    };
    if rng.random_bool(PAY_NOW_SHARE) {
        act(load, &id, Act::Pay).await
    } else {
        load.ledger.lock().untouched.push(id);
        true
    }
}

/// One client: creates orders and pays or cancels some, until a request goes unanswered.
async fn client(load: Arc<Load>, mut rng: StdRng, client: usize) {
    loop {
        let r: f64 = rng.random();
        let earlier = if r < PAY_LATER_SHARE + CANCEL_SHARE {
            let mut l = load.ledger.lock();
            if l.untouched.is_empty() {
                None
            } else {
                let i = rng.random_range(0..l.untouched.len());
                Some((l.untouched.swap_remove(i), if r < PAY_LATER_SHARE { Act::Pay } else { Act::Cancel }))
            }
        } else {
            None
        };
        let go_on = match earlier {
            Some((id, what)) => act(&load, &id, what).await,
            None => create(&load, &mut rng, client).await,
        };
        if !go_on {
            return;
        }
    }
}

/// Every order of `status`, newest first.
async fn all_orders(svc: &OrderService, status: OrderStatus) -> Vec<Order> {
    let mut out = Vec::new();
    let mut before = None;
    loop {
        let page = svc
            .list_orders(&OrderQuery { status: Some(status), buyer: None, before: before.clone(), limit: 500 })
            .await
            .expect("list orders");
        let full = page.len() == 500;
        before = page.last().map(|o| o.id.clone());
        out.extend(page);
        if !full {
            return out;
        }
    }
}

/// `GET path` on the final server, expecting 200 and a JSON array under `field`.
async fn list_len(http: &reqwest::Client, server: &Server, path: &str, field: &str) -> (usize, Value) {
    let a = call(http, Method::GET, &format!("{}{path}", server.base), None)
        .await
        .unwrap_or_else(|e| panic!("GET {path} on the last server: {e}"));
    assert_eq!(a.status, 200, "GET {path} on the last server: {}", a.body);
    let n = a.body[field].as_array().unwrap_or_else(|| panic!("GET {path}: no {field:?} array in {}", a.body)).len();
    (n, a.body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_orders_and_payments_survive_sigkill_of_the_server() {
    let started = Instant::now();
    let seed = seed();
    println!("serve_sigkill: seed {seed} (replay with {SEED_ENV}={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = TempDir::new().expect("tempdir");
    let db = dir.path().join("orders.db");
    let backend = format!("sqlite:{}", db.display());
    let ledger = Arc::new(Mutex::new(Ledger::default()));

    for round in 0..ROUNDS {
        let kill_after_ms = rng.random_range(KILL_AFTER_MS);
        let mut server = start_server(dir.path(), &backend, &format!("round-{round}")).await;
        if round == 0 {
            create_products(&server).await;
        }
        ledger.lock().rounds.push(RoundStats {
            port: server.port,
            kill_after_ms,
            startup_ms: server.startup.as_millis(),
            ..RoundStats::default()
        });
        let load = Arc::new(Load {
            http: http_client(),
            base: server.base.clone(),
            round,
            killed: AtomicBool::new(false),
            ledger: ledger.clone(),
        });
        let clients: Vec<JoinHandle<()>> = (0..CLIENTS)
            .map(|c| tokio::spawn(client(load.clone(), StdRng::seed_from_u64(rng.random()), c)))
            .collect();
        // The random moment is the point of the test: it is not waiting for anything.
        tokio::time::sleep(Duration::from_millis(kill_after_ms)).await;
        load.killed.store(true, Ordering::SeqCst);
        server.sigkill().await;
        let joined = tokio::time::timeout(CLIENT_STOP_TIMEOUT, futures::future::join_all(clients))
            .await
            .unwrap_or_else(|_| panic!("round {round}: the clients did not stop within {CLIENT_STOP_TIMEOUT:?} of the kill"));
        for (c, j) in joined.into_iter().enumerate() {
            j.unwrap_or_else(|e| panic!("round {round}: client {c} panicked: {e}"));
        }
        let r = ledger.lock().rounds[round].clone();
        println!(
            "round {round}: port {}, up in {} ms, killed after {kill_after_ms:4} ms: {} orders acked ({} out of stock), \
             {} payments acked ({} refused order_closed), {} cancels acked ({} refused closed), \
             unanswered create/pay/cancel {}/{}/{}, slowest answer {} ms",
            r.port,
            r.startup_ms,
            r.orders_acked,
            r.out_of_stock,
            r.payments_acked,
            r.pay_refused_closed,
            r.cancels_acked,
            r.cancel_refused_closed,
            r.creates_unanswered,
            r.pays_unanswered,
            r.cancels_unanswered,
            r.max_latency_ms
        );
    }

    // The last server: no load, no kill. Wait for every deadline to pass and every unpaid order
    // to be closed by its timer.
    let mut server = start_server(dir.path(), &backend, "final").await;
    let drain_started = Instant::now();
    let last_deadline = ledger.lock().orders.values().map(|o| o.pay_deadline).max().unwrap_or(0);
    let http = http_client();
    let pending_path = "/v1/orders?status=pending_payment&limit=1";
    let close_path = format!("/v1/timers?queue={Q_CLOSE}&limit=1");
    let remind_path = format!("/v1/timers?queue={Q_REMIND}&limit=1");
    loop {
        let past_deadlines = now_ms() > last_deadline;
        let (pending, pending_body) = list_len(&http, &server, pending_path, "orders").await;
        let (close_timers, close_body) = list_len(&http, &server, &close_path, "timers").await;
        let (remind_timers, remind_body) = list_len(&http, &server, &remind_path, "timers").await;
        if past_deadlines && pending == 0 && close_timers == 0 && remind_timers == 0 {
            break;
        }
        if drain_started.elapsed() >= DRAIN_TIMEOUT {
            let _ = server.child.start_kill();
            panic!(
                "the last server did not settle within {DRAIN_TIMEOUT:?} (last acknowledged deadline {} ms ago): \
                 pending orders {pending_body}, close timers {close_body}, remind timers {remind_body}; logs:\n{}",
                now_ms() - last_deadline,
                server_logs(dir.path())
            );
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
    let drain_took = drain_started.elapsed();
    let (dead_letters, dead_body) = list_len(&http, &server, "/v1/dead-letters?limit=10", "dead_letters").await;
    let final_startup = server.startup;
    let stop_started = Instant::now();
    let status = server.sigterm().await;
    let stop_took = stop_started.elapsed();
    assert!(
        status.success(),
        "the last server did not exit cleanly on SIGTERM ({status}); stderr:\n{}",
        read_file(&server.stderr)
    );

    // What the database says, read in-process now that no server holds it.
    let store = SqliteStore::open(&db, SqliteOptions::default()).await.expect("open the store after the last server");
    let svc = OrderService::open(store, Arc::new(SystemClock), OrderConfig::default())
        .await
        .expect("open the order service after the last server");
    let report = svc.check_invariants(INVARIANT_BOUND_MS).await.expect("check the invariants");
    let counts = svc.status_counts().await.expect("count orders by status");
    let count = |s: OrderStatus| counts.iter().find(|(st, _)| *st == s).map_or(0, |(_, n)| *n);

    // Every client has stopped: the ledger is final.
    let l = std::mem::take(&mut *ledger.lock());
    let mut lost_orders = Vec::new();
    let mut wrong_lines = Vec::new();
    let mut lost_payments = Vec::new();
    let mut wrong_status = Vec::new();
    let mut finals: BTreeMap<String, Order> = BTreeMap::new();
    for (id, acked) in &l.orders {
        match svc.get_order(id).await {
            Ok(order) => {
                // Lines are stored (and read back) in product order, not in request order.
                let mut lines: Vec<(String, i64)> = order.items.iter().map(|i| (i.product_id.clone(), i.quantity)).collect();
                lines.sort();
                let mut acked_lines = acked.lines.clone();
                acked_lines.sort();
                if lines != acked_lines || order.total_cents != acked.total_cents || order.pay_deadline != acked.pay_deadline {
                    wrong_lines.push(format!("{id}: acknowledged {acked:?}, stored {order:?}"));
                }
                finals.insert(id.clone(), order);
            }
            Err(e) => lost_orders.push(format!("{id} (acknowledged in round {}, {acked:?}): {e}", acked.round)),
        }
    }
    for (id, round) in &l.paid {
        let events = svc.order_events(id).await.map(|ev| ev.into_iter().map(|e| e.kind).collect::<Vec<_>>());
        match (finals.get(id), &events) {
            (Some(o), Ok(kinds))
                if o.status == OrderStatus::Paid && kinds.iter().any(|k| k == "paid") && !kinds.iter().any(|k| k == "closed") => {}
            (o, _) => lost_payments.push(format!(
                "{id} (payment acknowledged in round {round}): now {:?} ({:?}), events {events:?}",
                o.map(|o| o.status),
                o.and_then(|o| o.close_reason.clone())
            )),
        }
    }
    let expect_closed = [
        ("pay refused order_closed", &l.pay_refused_closed, None),
        ("cancel acknowledged", &l.cancelled, Some(CLOSE_BUYER_CANCEL)),
        ("cancel refused (already closed)", &l.cancel_refused_closed, None),
    ];
    for (what, ids, reason) in expect_closed {
        for (id, round) in ids {
            let o = finals.get(id);
            let ok = o.is_some_and(|o| {
                o.status == OrderStatus::Closed && reason.is_none_or(|r| o.close_reason.as_deref() == Some(r))
            });
            if !ok {
                wrong_status.push(format!(
                    "{id} ({what} in round {round}): now {:?} ({:?})",
                    o.map(|o| o.status),
                    o.and_then(|o| o.close_reason.clone())
                ));
            }
        }
    }
    let unsettled: Vec<(OrderStatus, u64)> = counts
        .iter()
        .filter(|(s, n)| *n > 0 && !matches!(s, OrderStatus::Paid | OrderStatus::Closed))
        .copied()
        .collect();

    // Stock by hand: nothing is ever added, so stock_total is the initial stock, and what is not
    // in stock is held by the paid orders (every other order is closed and gave its stock back).
    let paid_orders = all_orders(&svc, OrderStatus::Paid).await;
    let closed_orders = all_orders(&svc, OrderStatus::Closed).await;
    let mut held: BTreeMap<String, i64> = BTreeMap::new();
    for o in &paid_orders {
        for i in &o.items {
            *held.entry(i.product_id.clone()).or_default() += i.quantity;
        }
    }
    let mut stock_wrong = Vec::new();
    let mut stock_line = Vec::new();
    for (id, _, initial, _) in PRODUCTS {
        let p = svc.get_product(id).await.unwrap_or_else(|e| panic!("read product {id}: {e}"));
        let h = held.get(id).copied().unwrap_or(0);
        stock_line.push(format!("{id} {}/{} ({h} held by paid orders)", p.stock, p.stock_total));
        if p.stock_total != initial || p.stock_total - p.stock != h {
            stock_wrong.push(format!(
                "{id}: created with {initial}, now stock {} / stock_total {}, paid orders hold {h}",
                p.stock, p.stock_total
            ));
        }
    }
    let closed_timeout = closed_orders.iter().filter(|o| o.close_reason.as_deref() == Some(CLOSE_TIMEOUT)).count();
    let closed_cancel = closed_orders.iter().filter(|o| o.close_reason.as_deref() == Some(CLOSE_BUYER_CANCEL)).count();
    let sum = |f: fn(&RoundStats) -> usize| l.rounds.iter().map(f).sum::<usize>();
    let unacked_orders = report.orders.saturating_sub(l.orders.len() as u64);

    println!("serve_sigkill summary (seed {seed}):");
    println!(
        "  rounds {ROUNDS} x {CLIENTS} clients, kill moments {:?} ms (range {KILL_AFTER_MS:?}), server startups {:?} ms, final startup {} ms",
        l.rounds.iter().map(|r| r.kill_after_ms).collect::<Vec<_>>(),
        l.rounds.iter().map(|r| r.startup_ms).collect::<Vec<_>>(),
        final_startup.as_millis()
    );
    println!(
        "  acknowledged: orders {} (per round {:?}), payments {} (per round {:?}), cancels {}; \
         refused: out_of_stock {}, pay order_closed {}, cancel already closed {}",
        l.orders.len(),
        l.rounds.iter().map(|r| r.orders_acked).collect::<Vec<_>>(),
        l.paid.len(),
        l.rounds.iter().map(|r| r.payments_acked).collect::<Vec<_>>(),
        l.cancelled.len(),
        sum(|r| r.out_of_stock),
        l.pay_refused_closed.len(),
        l.cancel_refused_closed.len()
    );
    println!(
        "  errors seen: unanswered after the kill create/pay/cancel {}/{}/{}, unexpected {}; slowest answer {} ms",
        sum(|r| r.creates_unanswered),
        sum(|r| r.pays_unanswered),
        sum(|r| r.cancels_unanswered),
        l.unexpected.len(),
        l.rounds.iter().map(|r| r.max_latency_ms).max().unwrap_or(0)
    );
    println!(
        "  database: {} orders ({unacked_orders} never acknowledged), paid {}, closed {} (timeout {closed_timeout}, \
         buyer_cancel {closed_cancel}), pending {}, other {unsettled:?}; dead letters {dead_letters}",
        report.orders,
        count(OrderStatus::Paid),
        count(OrderStatus::Closed),
        count(OrderStatus::PendingPayment)
    );
    println!("  stock (stock/stock_total): {}", stock_line.join(", "));
    println!(
        "  invariants ok: {}; settled {:.1} s after the last start, SIGTERM stop {:.1} s; test {:.1} s",
        report.ok(),
        drain_took.as_secs_f64(),
        stop_took.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );

    // Every finding at once: a bug rarely shows in only one of them.
    let mut failed = Vec::new();
    let mut check = |ok: bool, what: String, list: &[String]| {
        if !ok {
            failed.push(format!("{what}\n{}", findings(list)));
        }
    };
    check(l.unexpected.is_empty(), format!("{} unexpected answers or errors:", l.unexpected.len()), &l.unexpected);
    check(report.ok(), format!("the order invariant is broken: {report:?}"), &[]);
    check(lost_orders.is_empty(), format!("{} acknowledged orders are lost:", lost_orders.len()), &lost_orders);
    check(wrong_lines.is_empty(), format!("{} orders differ from what was acknowledged:", wrong_lines.len()), &wrong_lines);
    check(
        lost_payments.is_empty(),
        format!("{} acknowledged payments did not stick (order not paid, or closed too):", lost_payments.len()),
        &lost_payments,
    );
    check(wrong_status.is_empty(), format!("{} orders are not closed as answered:", wrong_status.len()), &wrong_status);
    check(unsettled.is_empty(), format!("orders neither paid nor closed after the last deadline: {unsettled:?}"), &[]);
    check(stock_wrong.is_empty(), "stock is off:".to_owned(), &stock_wrong);
    check(dead_letters == 0, format!("order timers ended in the dead letters: {dead_body}"), &[]);
    check(
        !l.orders.is_empty() && !l.paid.is_empty(),
        format!(
            "the load acknowledged {} orders and {} payments: too little to test anything",
            l.orders.len(),
            l.paid.len()
        ),
        &[],
    );
    assert!(
        failed.is_empty(),
        "serve_sigkill failed (seed {seed}, replay with {SEED_ENV}={seed}):\n{}\nserver logs:\n{}",
        failed.join("\n"),
        server_logs(dir.path())
    );
}
