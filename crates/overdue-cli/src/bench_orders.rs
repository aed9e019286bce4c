//! `overdue bench orders`: the order service over HTTP, as a shop would load it.
//!
//! Starts `overdue serve` as a child process on a fresh SQLite database and a free loopback
//! port, seeds products, then `clients` concurrent HTTP clients create orders for `seconds`
//! seconds; a `pay_ratio` share of the orders is paid right away. The payment timeout is short
//! (`timeout_secs`), so every unpaid order's close timer fires during the run. Reported: orders/s
//! created and paid, close lateness p50/p99/max (from each closed order's `closed` event against
//! its deadline), and the server's peak RSS.

use std::process::{ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use rand::Rng;
use serde::Serialize;
use serde_json::{Value, json};

/// Options of `overdue bench orders`.
#[derive(Debug, Args)]
pub struct OrdersBenchArgs {
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 64)]
    clients: usize,
    /// How long clients create orders, seconds.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Share of orders paid right after creation.
    #[arg(long, default_value_t = 0.5)]
    pay_ratio: f64,
    /// Payment timeout of every order, seconds.
    #[arg(long, default_value_t = 5)]
    timeout_secs: u64,
    /// Trigger of the server: wheel, heap or scan.
    #[arg(long, default_value = "wheel")]
    trigger: String,
    /// SQLite durability of the server's store: buffer, normal or full.
    #[arg(long, default_value = "full")]
    durability: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Default, Serialize)]
struct OrdersReport {
    clients: usize,
    seconds: u64,
    durability: String,
    trigger: String,
    created: u64,
    created_per_sec: f64,
    paid: u64,
    paid_per_sec: f64,
    closed: u64,
    close_lateness_p50_ms: u64,
    close_lateness_p99_ms: u64,
    close_lateness_max_ms: u64,
    server_peak_rss_bytes: u64,
    errors: u64,
}

fn free_port() -> anyhow::Result<u16> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("finding a free port")?;
    Ok(l.local_addr()?.port())
}

fn peak_rss(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).and_then(|l| l.split_whitespace().nth(1)).and_then(|v| v.parse::<u64>().ok()))
        .map_or(0, |kib| kib * 1024)
}

pub async fn run(args: OrdersBenchArgs) -> anyhow::Result<ExitCode> {
    if args.clients == 0 || args.seconds == 0 || !(0.0..=1.0).contains(&args.pay_ratio) || args.timeout_secs == 0 {
        bail!("--clients, --seconds and --timeout-secs must be positive and --pay-ratio within 0..=1");
    }
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let exe = std::env::current_exe().context("locating the overdue binary")?;
    let mut child = tokio::process::Command::new(exe)
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--trigger", &args.trigger])
        .arg("--backend")
        .arg(format!("sqlite:{}?durability={}", tmp.path().join("orders.db").display(), args.durability))
        .args(["--pay-timeout-secs", &args.timeout_secs.to_string(), "--remind-before-secs", "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting overdue serve")?;
    let pid = child.id().unwrap_or(0);
    let http = reqwest::Client::builder().pool_max_idle_per_host(args.clients).build()?;
    let ready = Instant::now() + Duration::from_secs(30);
    loop {
        if http.get(format!("{base}/healthz")).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        if Instant::now() > ready {
            bail!("overdue serve did not become healthy within 30 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    for (id, stock) in [("p1", 1_000_000_000i64), ("p2", 1_000_000_000), ("p3", 1_000_000_000)] {
        let r = http.post(format!("{base}/v1/products")).json(&json!({"id": id, "name": id, "price_cents": 1000, "stock": stock})).send().await?;
        if !r.status().is_success() {
            bail!("seeding product {id}: {}", r.text().await.unwrap_or_default());
        }
    }

    let (created, paid, errors) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop_at = Instant::now() + Duration::from_secs(args.seconds);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..args.clients {
        let (http, base, created, paid, errors, ratio) = (http.clone(), base.clone(), created.clone(), paid.clone(), errors.clone(), args.pay_ratio);
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop_at {
                n += 1;
                let product = ["p1", "p2", "p3"][(n % 3) as usize];
                let body = json!({"buyer": format!("b{c}-{n}"), "items": [{"product_id": product, "quantity": 1}]});
                let Ok(r) = http.post(format!("{base}/v1/orders")).json(&body).send().await else {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if !r.status().is_success() {
                    errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                created.fetch_add(1, Ordering::Relaxed);
                let Ok(order) = r.json::<Value>().await else { continue };
                if rand::rng().random_bool(ratio) {
                    let id = order.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                    match http.post(format!("{base}/v1/orders/{id}/pay")).send().await {
                        Ok(r) if r.status().is_success() => {
                            paid.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let load_secs = started.elapsed().as_secs_f64();
    // Wait for the last deadlines, then for no order to be pending.
    tokio::time::sleep(Duration::from_secs(args.timeout_secs)).await;
    let give_up = Instant::now() + Duration::from_secs(60);
    let still_pending = loop {
        let r: Value = http.get(format!("{base}/v1/orders?status=pending_payment&limit=1")).send().await?.json().await?;
        let pending = r.get("orders").and_then(Value::as_array).is_some_and(|a| !a.is_empty());
        if !pending || Instant::now() > give_up {
            break pending;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let mut lateness = Histogram::<u64>::new_with_max(3_600_000, 3)?;
    let mut early = 0u64;
    let mut before: Option<String> = None;
    loop {
        let q = before.as_ref().map_or(String::new(), |b| format!("&before={b}"));
        let page: Value = http.get(format!("{base}/v1/orders?status=closed&limit=500{q}")).send().await?.json().await?;
        let orders = page.get("orders").and_then(Value::as_array).cloned().unwrap_or_default();
        for o in &orders {
            let id = o.get("id").and_then(Value::as_str).unwrap_or_default();
            let deadline = o.get("pay_deadline").and_then(Value::as_i64).unwrap_or(0);
            let full: Value = http.get(format!("{base}/v1/orders/{id}")).send().await?.json().await?;
            let closed_at = full
                .get("events")
                .and_then(Value::as_array)
                .and_then(|evs| evs.iter().find(|e| e.get("kind").and_then(Value::as_str) == Some("closed")))
                .and_then(|e| e.get("at").and_then(Value::as_i64));
            if let Some(at) = closed_at {
                if at < deadline {
                    early += 1;
                }
                lateness.saturating_record((at - deadline).max(0) as u64);
            }
        }
        match page.get("next_before").and_then(Value::as_str) {
            Some(n) if !orders.is_empty() => before = Some(n.to_owned()),
            _ => break,
        }
    }
    let rss = peak_rss(pid);
    let _ = child.start_kill();
    let _ = child.wait().await;

    let r = OrdersReport {
        clients: args.clients,
        seconds: args.seconds,
        durability: args.durability.clone(),
        trigger: args.trigger.clone(),
        created: created.load(Ordering::Relaxed),
        created_per_sec: created.load(Ordering::Relaxed) as f64 / load_secs,
        paid: paid.load(Ordering::Relaxed),
        paid_per_sec: paid.load(Ordering::Relaxed) as f64 / load_secs,
        closed: lateness.len(),
        close_lateness_p50_ms: lateness.value_at_quantile(0.5),
        close_lateness_p99_ms: lateness.value_at_quantile(0.99),
        close_lateness_max_ms: lateness.max(),
        server_peak_rss_bytes: rss,
        errors: errors.load(Ordering::Relaxed),
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!("overdue bench orders — {} clients for {} s, durability {}, trigger {}", r.clients, r.seconds, r.durability, r.trigger);
        println!("{:<36} {:>14}", "orders created", format!("{} ({:.0}/s)", r.created, r.created_per_sec));
        println!("{:<36} {:>14}", "orders paid", format!("{} ({:.0}/s)", r.paid, r.paid_per_sec));
        println!("{:<36} {:>14}", "closed on timeout", r.closed);
        println!("{:<36} {:>14}", "close lateness p50 / p99 / max", format!("{} / {} / {} ms", r.close_lateness_p50_ms, r.close_lateness_p99_ms, r.close_lateness_max_ms));
        println!("{:<36} {:>14}", "server peak RSS", format!("{:.1} MB", r.server_peak_rss_bytes as f64 / 1e6));
        println!("{:<36} {:>14}", "request errors", r.errors);
    }
    if still_pending || early > 0 {
        eprintln!("FAIL: {} — the invariant does not hold",
            if still_pending { "orders were still pending a minute after their deadline" } else { "orders closed before their deadline" });
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}
