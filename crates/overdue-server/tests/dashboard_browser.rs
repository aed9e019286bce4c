//! The dashboard in a real headless Chromium (Debian's `chromium` driven through its
//! `chromedriver`; never a downloaded browser): orders and timers are made through the API, and
//! the page must show the numbers the API returns, look up, reschedule and cancel a timer, show
//! an order's timeline with the timer that closed it, and replay dead letters until the list is
//! empty. The server has a token, so the page must ask for it once. Screenshots go to
//! `target/dashboard-screenshots/` for a person to look at.
//!
//! Needs `/usr/bin/chromium` and `/usr/bin/chromedriver` (or `OVERDUE_CHROMIUM` /
//! `OVERDUE_CHROMEDRIVER`); `.ci/run` installs them. Without them the test is skipped with a
//! message, except under `CI`, where it fails.
//!
//! The server runs on a manual clock, so due times and closes are exact; the only waiting is for
//! the page to render what the server already has (polled, with a deadline).

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::{T0, TestServer};
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::{Value, json};

const TOKEN: &str = "dash-token-1";
/// How long the page may take to show what the server already has (it polls every 2 s).
const RENDER_DEADLINE: Duration = Duration::from_secs(20);
const MIN: i64 = 60_000;

fn tool(env: &str, default: &str) -> Option<PathBuf> {
    let p = std::env::var_os(env).map(PathBuf::from).unwrap_or_else(|| PathBuf::from(default));
    p.exists().then_some(p)
}

fn screenshot_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    let dir = target.join("dashboard-screenshots");
    std::fs::create_dir_all(&dir).expect("create the screenshot directory");
    dir
}

/// chromedriver on a free loopback port; killed when dropped.
struct Driver {
    _child: tokio::process::Child,
    url: String,
}

impl Driver {
    async fn start(path: &Path) -> Driver {
        let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
        let child = tokio::process::Command::new(path)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .expect("start chromedriver");
        let url = format!("http://127.0.0.1:{port}");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(r) = http.get(format!("{url}/status")).send().await
                && let Ok(v) = r.json::<Value>().await
                && v["value"]["ready"] == true
            {
                break;
            }
            assert!(Instant::now() < deadline, "chromedriver did not become ready on {url}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Driver { _child: child, url }
    }
}

async fn browser(driver: &Driver, chromium: &Path, profile: &Path) -> Client {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": chromium,
            "args": ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--window-size=1400,1100",
                     format!("--user-data-dir={}", profile.display())],
        }),
    );
    ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("a chromium session")
}

/// Runs `script` (a function body returning a value) in the page until `ok` accepts its result.
async fn eventually(c: &Client, what: &str, script: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + RENDER_DEADLINE;
    loop {
        let v = c.execute(script, vec![]).await.unwrap_or(Value::Null);
        if ok(&v) {
            return v;
        }
        if Instant::now() > deadline {
            let body = c.execute("return document.body.innerText", vec![]).await.unwrap_or_default();
            panic!("the page never showed {what}; last value {v}; page text:\n{}", body.as_str().unwrap_or(""));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `data-value` of the element `sel`, once it equals `want`.
async fn shows(c: &Client, sel: &str, want: impl std::fmt::Display) {
    let want = want.to_string();
    let script = format!("const e = document.querySelector({sel:?}); return e ? (e.dataset.value ?? e.textContent) : null;");
    eventually(c, &format!("{sel} = {want}"), &script, |v| v.as_str() == Some(want.as_str())).await;
}

/// Clicks `sel`, retrying while it is missing or covered (a dialog still closing, a table being
/// re-rendered under the pointer) until [`RENDER_DEADLINE`].
async fn click(c: &Client, sel: &str) {
    let deadline = Instant::now() + RENDER_DEADLINE;
    loop {
        let err = match c.find(Locator::Css(sel)).await {
            Ok(e) => match e.click().await {
                Ok(()) => return,
                Err(err) => err.to_string(),
            },
            Err(err) => err.to_string(),
        };
        assert!(Instant::now() < deadline, "could not click {sel}: {err}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn confirm(c: &Client) {
    eventually(c, "the confirmation dialog", "return document.querySelector('#confirm-dialog').open", |v| v == &json!(true)).await;
    click(c, "#confirm-yes").await;
}

async fn shot(c: &Client, dir: &Path, name: &str) {
    let png = c.screenshot().await.expect("screenshot");
    std::fs::write(dir.join(format!("{name}.png")), png).expect("write screenshot");
}

fn count_rows(sel: &str) -> String {
    format!("return document.querySelectorAll({sel:?}).length")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_shows_what_the_api_says_and_its_actions_work() {
    let (Some(chromium), Some(chromedriver)) =
        (tool("OVERDUE_CHROMIUM", "/usr/bin/chromium"), tool("OVERDUE_CHROMEDRIVER", "/usr/bin/chromedriver"))
    else {
        let msg = "chromium and chromedriver are needed (apt-get install chromium chromium-driver, or set OVERDUE_CHROMIUM / OVERDUE_CHROMEDRIVER)";
        assert!(std::env::var_os("CI").is_none(), "{msg}");
        eprintln!("skipped: {msg}");
        return;
    };
    // Callbacks to `rx` fail until it is told to answer 200; one failure dead-letters.
    let rx = common::Receiver::start("/hook").await;
    rx.answer(500);
    let s = TestServer::start_with(|cfg| {
        cfg.token = Some(TOKEN.into());
        cfg.callback_queue.max_attempts = 1;
    })
    .await;

    // --- what the API holds
    assert_eq!(s.post("/v1/products", json!({"id": "tea", "name": "Tea", "price_cents": 450, "stock": 50})).await.0, 201);
    let mut orders = Vec::new();
    for buyer in ["ann", "bob", "cy", "dee"] {
        let (st, o) = s.post("/v1/orders", json!({"buyer": buyer, "items": [{"product_id": "tea", "quantity": 2}]})).await;
        assert_eq!(st, 201, "{o}");
        orders.push(o["id"].as_str().expect("id").to_owned());
    }
    assert_eq!(s.post_empty(&format!("/v1/orders/{}/pay", orders[0])).await.0, 200);
    assert_eq!(s.post_empty(&format!("/v1/orders/{}/cancel", orders[1])).await.0, 200);
    let (st, welcome) =
        s.post("/v1/timers", json!({"queue": "mail", "key": "welcome/ann", "delay_ms": 3_600_000, "callback_url": rx.url, "payload": {"to": "ann"}})).await;
    assert_eq!(st, 201, "{welcome}");
    for key in ["hook-1", "hook-2"] {
        assert_eq!(s.post("/v1/timers", json!({"queue": "hooks", "key": key, "delay_ms": 0, "callback_url": rx.url})).await.0, 201);
    }
    s.advance(0).await; // the two hooks fire, fail once, and are dead letters
    let (_, dl) = s.get("/v1/dead-letters").await;
    assert_eq!(dl["dead_letters"].as_array().map(Vec::len), Some(2), "{dl}");
    let (_, o) = s.get("/v1/overview").await;
    let pending: u64 = o["queues"].as_array().expect("queues").iter().map(|q| q["pending"].as_u64().unwrap_or(0)).sum();
    assert_eq!(pending, 1 + 2 * 2, "welcome, and a close and a reminder for each of two unpaid orders: {o}");

    // --- the page: it asks for the token once, then shows the same numbers
    let driver = Driver::start(&chromedriver).await;
    let profile = tempfile::tempdir().expect("profile dir");
    let c = browser(&driver, &chromium, profile.path()).await;
    let shots = screenshot_dir();
    c.goto(&format!("{}/", s.base)).await.expect("open the dashboard");
    eventually(&c, "the token prompt", "return document.querySelector('#token-dialog').open", |v| v == &json!(true)).await;
    c.find(Locator::Css("#token-input")).await.expect("token input").send_keys(TOKEN).await.expect("type token");
    click(&c, "#token-submit").await;
    shows(&c, "#stat-pending", pending).await;
    shows(&c, "#stat-dead", 2).await;
    shows(&c, "#stat-fired", o["engine"]["fired"].as_u64().expect("fired")).await;
    shows(&c, "#stat-failures", 2).await;
    shows(&c, "#stat-orders", 4).await;
    shows(&c, "#stat-rescued", 0).await;
    shows(&c, "#node-store", "store sqlite").await;
    shows(&c, "#node-trigger", "trigger wheel").await;
    shows(&c, "#queues tr[data-queue='order.close'] td[data-col='next_hour']", 2).await;
    shows(&c, "#queues tr[data-queue='mail'] td[data-col='next_hour']", 1).await;
    shows(&c, "#due-chart rect[data-bucket='next_hour']", 5).await;
    eventually(&c, "this node, alive", &count_rows("#nodes tbody tr[data-alive='true']"), |v| v == &json!(1)).await;
    eventually(&c, "the upcoming list", &count_rows("#upcoming tbody tr[data-key]"), |v| v == &json!(5)).await;
    shot(&c, &shots, "overview").await;

    // --- timer lookup, reschedule, cancel
    c.goto(&format!("{}/#/timers?queue=mail&key={}", s.base, "welcome%2Fann")).await.expect("timers tab");
    shows(&c, "#timer-status", "pending").await;
    shows(&c, "#timer-generation", welcome["generation"].as_u64().expect("generation")).await;
    shows(&c, "#timer-due", T0 + 3_600_000).await;
    eventually(&c, "the payload", "return document.querySelector('#timer-payload').textContent", |v| {
        v.as_str().is_some_and(|t| t.contains("\"to\": \"ann\""))
    })
    .await;
    let secs = c.find(Locator::Css("#reschedule-secs")).await.expect("seconds input");
    secs.clear().await.expect("clear");
    secs.send_keys("120").await.expect("type");
    click(&c, "#timer-reschedule").await;
    shows(&c, "#timer-due", T0 + 120_000).await;
    let (_, t) = s.get("/v1/timers/mail/welcome%2Fann").await;
    assert_eq!(t["due_at"], T0 + 120_000, "the page's reschedule reached the store: {t}");
    shot(&c, &shots, "timer").await;
    // An order timer cannot be changed from here: the API's refusal is shown.
    c.goto(&format!("{}/#/timers?queue=order.close&key={}", s.base, orders[2])).await.expect("order timer");
    shows(&c, "#timer-status", "pending").await;
    click(&c, "#timer-fire-now").await;
    eventually(&c, "the refusal", "return document.querySelector('#timer-message').textContent", |v| {
        v.as_str().is_some_and(|t| t.starts_with("invalid_input") && t.contains("order service"))
    })
    .await;
    c.goto(&format!("{}/#/timers?queue=mail&key={}", s.base, "welcome%2Fann")).await.expect("timers tab");
    shows(&c, "#timer-status", "pending").await;
    click(&c, "#timer-cancel").await;
    confirm(&c).await;
    eventually(&c, "the cancel message", "return document.querySelector('#timer-message').textContent", |v| {
        v.as_str().is_some_and(|t| t.starts_with("cancelled"))
    })
    .await;
    assert_eq!(s.get("/v1/timers/mail/welcome%2Fann").await.0, 404, "cancelled through the page");

    // --- orders: the list, a filter, and a timeline driven by a timer
    s.advance(25 * MIN).await; // the reminders of the two unpaid orders…
    s.advance(5 * MIN).await; // …then their close
    let (_, closed) = s.get("/v1/orders?status=closed").await;
    assert_eq!(closed["orders"].as_array().map(Vec::len), Some(3), "{closed}");
    c.goto(&format!("{}/#/orders", s.base)).await.expect("orders tab");
    eventually(&c, "four orders", &count_rows("#orders-table tbody tr[data-order-id]"), |v| v == &json!(4)).await;
    c.find(Locator::Css("#order-status")).await.expect("filter").select_by_value("closed").await.expect("select");
    eventually(&c, "three closed orders", &count_rows("#orders-table tbody tr[data-status='closed']"), |v| v == &json!(3)).await;
    eventually(&c, "only closed orders", &count_rows("#orders-table tbody tr[data-order-id]"), |v| v == &json!(3)).await;
    c.goto(&format!("{}/#/orders/{}", s.base, orders[2])).await.expect("order detail");
    shows(&c, "#order-detail-status", "closed").await;
    eventually(&c, "the timeline", "return [...document.querySelectorAll('#order-timeline li')].map(l => l.dataset.kind + ':' + l.dataset.source)", |v| {
        v == &json!(["created:api", "reminded:order.remind", "closed:order.close"])
    })
    .await;
    shot(&c, &shots, "order").await;

    // --- dead letters: replay one, then all; each leaves the list
    rx.answer(200);
    c.goto(&format!("{}/#/dead-letters", s.base)).await.expect("dead letters tab");
    eventually(&c, "two dead letters", &count_rows("#dl-table tbody tr[data-dl-id]"), |v| v == &json!(2)).await;
    eventually(&c, "their error", "return document.querySelector('#dl-table td.err').textContent", |v| {
        v.as_str().is_some_and(|t| t.contains("500"))
    })
    .await;
    shot(&c, &shots, "dead-letters").await;
    let first = dl["dead_letters"][0]["id"].as_i64().expect("id");
    click(&c, &format!("#dl-table tr[data-dl-id='{first}'] .dl-replay")).await;
    confirm(&c).await;
    eventually(&c, "the replayed row gone", &count_rows(&format!("#dl-table tr[data-dl-id='{first}']")), |v| v == &json!(0)).await;
    s.advance(0).await; // the replayed hook fires and its callback now succeeds
    click(&c, "#dl-replay-all").await;
    confirm(&c).await;
    eventually(&c, "an empty list", &count_rows("#dl-table tbody tr[data-dl-id]"), |v| v == &json!(0)).await;
    s.advance(0).await;
    let (_, dl) = s.get("/v1/dead-letters").await;
    assert_eq!(dl["dead_letters"], json!([]), "{dl}");
    c.goto(&format!("{}/#/overview", s.base)).await.expect("overview");
    shows(&c, "#stat-dead", 0).await;
    shot(&c, &shots, "overview-after").await;

    c.close().await.expect("close the browser");
    drop(driver);
    s.stop().await;
}
