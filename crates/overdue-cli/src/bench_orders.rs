//! `overdue bench orders`: the order service over HTTP, as a shop would load it.
//!
//! Starts `overdue serve` as a child process on a fresh SQLite database and a free loopback
//! port, seeds products, then `clients` concurrent HTTP clients create orders for `seconds`
//! seconds; a `pay_ratio` share of the orders is paid right away. The payment timeout is short
//! (`timeout_secs`), so every unpaid order's close timer fires during the run. Reported: orders/s
//! created and paid, close lateness p50/p99/max (from each closed order's `closed` event against
//! its deadline), and the server's peak RSS.
//!
//! With `--plot DIR` the report is also written to `DIR/orders.json`, beside two SVG plots
//! (see [`crate::plot`]): `orders-lateness.svg`, the distribution of close lateness, and
//! `orders-throughput.svg`, orders created, paid and closed per second over the run. Created
//! and paid come from the counters the clients keep anyway, closed from each closed order's
//! timestamp after the run; nothing is added to the load path.

use std::path::PathBuf;
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
    /// Run the server on this database instead of a fresh SQLite file: `postgres://…` (a fresh
    /// schema `overdue_bench_<ms>` is created and dropped) or `mysql://USER@HOST:PORT` (a fresh
    /// database `overdue_bench_<ms>` is created and dropped; any database in the URL is
    /// replaced) or `redis://…` (timers in Redis under a fresh key prefix, deleted after; orders
    /// in a fresh SQLite file, relayed through the outbox table).
    #[arg(long)]
    backend: Option<String>,
    /// Load generator: `raw` (hand-written HTTP/1.1 on keep-alive connections, one thread) or
    /// `reqwest` (the reqwest client on the bench's runtime; costs more CPU per request).
    #[arg(long, value_enum, default_value = "raw")]
    loadgen: LoadGen,
    /// A command the server is started under, split at spaces (for profiling, e.g.
    /// `valgrind --tool=callgrind`); the server is stopped with SIGTERM so it can write its
    /// profile.
    #[arg(long, hide = true)]
    server_wrapper: Option<String>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// Also write the report (orders.json) and SVG plots of close lateness and orders per
    /// second over time (orders-lateness.svg, orders-throughput.svg) into this directory,
    /// created if missing.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
}

/// Which HTTP client drives the load.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LoadGen {
    Raw,
    Reqwest,
}

#[derive(Debug, Default, Serialize)]
struct OrdersReport {
    clients: usize,
    seconds: u64,
    durability: String,
    backend: String,
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
    loadgen: Option<LoadGen>,
    /// CPU seconds of the server from the first order until no order was pending.
    server_cpu_secs: f64,
    /// CPU seconds of the server during the load phase only.
    server_cpu_load_secs: f64,
    /// CPU seconds of the bench process (the load generator) during the load phase.
    loadgen_cpu_secs: f64,
    /// (server_cpu_secs + loadgen_cpu_secs) / created, microseconds.
    cpu_us_per_order: f64,
    server_cpu_us_per_order: f64,
    loadgen_cpu_us_per_order: f64,
    /// Server CPU seconds by thread name over the same window as `server_cpu_secs`.
    server_threads: Vec<(String, f64)>,
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
    // Before any work: a --plot directory that cannot be written fails the run now.
    let plots = args.plot.as_deref().map(crate::plot::PlotDir::create).transpose()?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let place = match &args.backend {
        None => Place::Sqlite(format!("sqlite:{}?durability={}", tmp.path().join("orders.db").display(), args.durability)),
        Some(url) => Place::fresh(url, tmp.path(), &args.durability).await?,
    };
    let result = bench(&args, &place, plots.as_ref()).await;
    place.drop_fresh().await;
    result
}

/// Where a bench keeps its data, and how to clean it away (also `overdue bench`'s fresh
/// PostgreSQL schema).
pub(crate) enum Place {
    Sqlite(String),
    /// `(server url, url of the fresh place, name)`.
    Postgres(String, String, String),
    Mysql(String, String, String),
    /// `(redis url with the fresh prefix, the prefix, orders url)`.
    Redis(String, String, String),
}

impl Place {
    pub(crate) fn url(&self) -> &str {
        match self {
            Place::Sqlite(u) | Place::Postgres(_, u, _) | Place::Mysql(_, u, _) | Place::Redis(u, _, _) => u,
        }
    }

    fn describe(&self) -> String {
        match self {
            Place::Sqlite(_) => "sqlite".to_owned(),
            Place::Postgres(_, _, n) => format!("postgres (schema {n})"),
            Place::Mysql(_, _, n) => format!("mysql (database {n})"),
            Place::Redis(_, p, _) => format!("redis timers (prefix {p}), sqlite orders"),
        }
    }

    /// The `--orders` URL of the server, when the timers are in Redis.
    fn orders(&self) -> Option<&str> {
        match self {
            Place::Redis(_, _, o) => Some(o),
            _ => None,
        }
    }

    pub(crate) async fn fresh(url: &str, dir: &std::path::Path, durability: &str) -> anyhow::Result<Place> {
        let name = format!("overdue_bench_{}", overdue::Clock::now_ms(&overdue::SystemClock));
        let (base, query) = url.split_once('?').map_or((url, None), |(b, q)| (b, Some(q)));
        if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            if url.contains("schema=") {
                bail!("--backend: leave out schema=; the bench creates a fresh schema and drops it after the run");
            }
            let sep = if query.is_some() { '&' } else { '?' };
            return Ok(Place::Postgres(base.to_owned(), format!("{url}{sep}schema={name}"), name));
        }
        if url.starts_with("mysql://") {
            let host_end = base.find("://").map(|i| i + 3).and_then(|s| base[s..].find('/').map(|i| s + i)).unwrap_or(base.len());
            let server = &base[..host_end];
            mysql_admin(server, &format!("CREATE DATABASE {name}")).await?;
            let fresh = match query {
                Some(q) => format!("{server}/{name}?{q}"),
                None => format!("{server}/{name}"),
            };
            return Ok(Place::Mysql(server.to_owned(), fresh, name));
        }
        if url.starts_with("redis://") {
            if url.contains("prefix=") {
                bail!("--backend: leave out prefix=; the bench uses a fresh key prefix and deletes it after the run");
            }
            let sep = if query.is_some() { '&' } else { '?' };
            let orders = format!("sqlite:{}?durability={durability}", dir.join("orders.db").display());
            return Ok(Place::Redis(format!("{url}{sep}prefix={name}"), name, orders));
        }
        bail!("--backend must be postgres://…, mysql://… or redis://… (leave it out for SQLite)")
    }

    /// Drops the fresh schema or database (best effort: a failure is reported, the results stand).
    pub(crate) async fn drop_fresh(&self) {
        let done = match self {
            Place::Sqlite(_) => Ok(()),
            Place::Postgres(server, _, name) => pg_admin(server, &format!("DROP SCHEMA IF EXISTS {name} CASCADE")).await,
            Place::Mysql(server, _, name) => mysql_admin(server, &format!("DROP DATABASE IF EXISTS {name}")).await,
            Place::Redis(url, prefix, _) => redis_purge(url, prefix).await,
        };
        if let Err(e) = done {
            eprintln!("warning: could not drop the bench's {}: {e:#}", self.describe());
        }
    }
}

/// Deletes every key under `prefix` (SCAN + UNLINK, a page at a time).
async fn redis_purge(url: &str, prefix: &str) -> anyhow::Result<()> {
    #[cfg(feature = "redis")]
    {
        let client = redis::Client::open(url).context("redis url")?;
        let mut con = client.get_multiplexed_async_connection().await?;
        for pattern in [format!("{prefix}:*"), format!("{{{prefix}:*")] {
            let mut cursor: u64 = 0;
            loop {
                let (next, keys): (u64, Vec<String>) =
                    redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(&pattern).arg("COUNT").arg(1000).query_async(&mut con).await?;
                if !keys.is_empty() {
                    redis::cmd("UNLINK").arg(&keys).query_async::<()>(&mut con).await?;
                }
                if next == 0 {
                    break;
                }
                cursor = next;
            }
        }
        Ok(())
    }
    #[cfg(not(feature = "redis"))]
    {
        let _ = (url, prefix);
        bail!("this build has no redis support")
    }
}

async fn pg_admin(server: &str, statement: &str) -> anyhow::Result<()> {
    #[cfg(feature = "postgres")]
    {
        let pool = sqlx::PgPool::connect(server).await.with_context(|| format!("connecting to {}", overdue::redact_url(server)))?;
        sqlx::query(statement).execute(&pool).await?;
        pool.close().await;
        Ok(())
    }
    #[cfg(not(feature = "postgres"))]
    {
        let _ = (server, statement);
        bail!("this build has no postgres support")
    }
}

async fn mysql_admin(server: &str, statement: &str) -> anyhow::Result<()> {
    #[cfg(feature = "mysql")]
    {
        let pool = sqlx::MySqlPool::connect(server).await.with_context(|| format!("connecting to {}", overdue::redact_url(server)))?;
        sqlx::query(statement).execute(&pool).await?;
        pool.close().await;
        Ok(())
    }
    #[cfg(not(feature = "mysql"))]
    {
        let _ = (server, statement);
        bail!("this build has no mysql support")
    }
}

async fn bench(args: &OrdersBenchArgs, place: &Place, plots: Option<&crate::plot::PlotDir>) -> anyhow::Result<ExitCode> {
    let port = free_port()?;
    let base = format!("http://127.0.0.1:{port}");
    let exe = std::env::current_exe().context("locating the overdue binary")?;
    let wrapper: Vec<String> = args.server_wrapper.as_deref().unwrap_or("").split_whitespace().map(str::to_owned).collect();
    let mut command = match wrapper.split_first() {
        Some((program, rest)) => {
            let mut c = tokio::process::Command::new(program);
            c.args(rest).arg(&exe);
            c
        }
        None => tokio::process::Command::new(&exe),
    };
    let mut child = command
        .args(["serve", "--listen", &format!("127.0.0.1:{port}"), "--trigger", &args.trigger])
        .arg("--backend")
        .arg(place.url())
        .args(place.orders().map(|o| ["--orders", o]).into_iter().flatten())
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
    let counters = Counters { created: created.clone(), paid: paid.clone(), errors: errors.clone() };
    let server_cpu_before = cpu_secs(&format!("/proc/{pid}/stat"));
    let server_threads_before = thread_cpu(pid);
    let self_cpu_before = cpu_secs("/proc/self/stat");
    let sampler = match plots {
        Some(_) => {
            let (c, p) = (created.clone(), paid.clone());
            Some(crate::plot::Sampler::start(&["created /s", "paid /s"], move || vec![c.load(Ordering::Relaxed), p.load(Ordering::Relaxed)])?)
        }
        None => None,
    };
    let mark = |label: &str| {
        if let Some(s) = &sampler {
            s.mark(label);
        }
    };
    mark("clients start");
    let started = Instant::now();
    let stop_at = started + Duration::from_secs(args.seconds);
    match args.loadgen {
        LoadGen::Raw => raw_load(port, args.clients, args.pay_ratio, stop_at, counters).await?,
        LoadGen::Reqwest => reqwest_load(&http, &base, args.clients, args.pay_ratio, stop_at, counters).await,
    }
    let load_secs = started.elapsed().as_secs_f64();
    mark("clients stop");
    let loadgen_cpu = cpu_secs("/proc/self/stat") - self_cpu_before;
    let server_cpu_load = cpu_secs(&format!("/proc/{pid}/stat")) - server_cpu_before;
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
    mark("none pending");
    let timeline = sampler.map(crate::plot::Sampler::finish);
    // Everything the server spent on this run's orders: requests, timers and their writes.
    let server_cpu = cpu_secs(&format!("/proc/{pid}/stat")) - server_cpu_before;
    let mut server_threads: Vec<(String, f64)> = thread_cpu(pid)
        .into_iter()
        .map(|(name, secs)| {
            let before = server_threads_before.iter().find(|(n, _)| *n == name).map_or(0.0, |(_, s)| *s);
            (name, secs - before)
        })
        .filter(|(_, secs)| *secs > 0.0)
        .collect();
    server_threads.sort_by(|a, b| b.1.total_cmp(&a.1));

    // A closed order never changes again, so its `updated_at` is the `at` of its `closed` event
    // (both are the closing write's "now"); the first pages are checked against the events.
    let mut lateness = Histogram::<u64>::new_with_max(3_600_000, 3)?;
    let mut closed_at = Vec::new();
    let (mut early, mut mismatched, mut checked) = (0u64, 0u64, 0u32);
    let mut before: Option<String> = None;
    loop {
        let q = before.as_ref().map_or(String::new(), |b| format!("&before={b}"));
        let page: Value = http.get(format!("{base}/v1/orders?status=closed&limit=500{q}")).send().await?.json().await?;
        let orders = page.get("orders").and_then(Value::as_array).cloned().unwrap_or_default();
        for o in &orders {
            let deadline = o.get("pay_deadline").and_then(Value::as_i64).unwrap_or(0);
            let Some(at) = o.get("updated_at").and_then(Value::as_i64) else { continue };
            if checked < 200 {
                checked += 1;
                let id = o.get("id").and_then(Value::as_str).unwrap_or_default();
                let full: Value = http.get(format!("{base}/v1/orders/{id}")).send().await?.json().await?;
                let event_at = full
                    .get("events")
                    .and_then(Value::as_array)
                    .and_then(|evs| evs.iter().find(|e| e.get("kind").and_then(Value::as_str) == Some("closed")))
                    .and_then(|e| e.get("at").and_then(Value::as_i64));
                if event_at != Some(at) {
                    mismatched += 1;
                }
            }
            if at < deadline {
                early += 1;
            }
            closed_at.push(at);
            lateness.saturating_record((at - deadline).max(0) as u64);
        }
        match page.get("next_before").and_then(Value::as_str) {
            Some(n) if !orders.is_empty() => before = Some(n.to_owned()),
            _ => break,
        }
    }
    let rss = peak_rss(pid);
    if wrapper.is_empty() {
        let _ = child.start_kill();
    } else {
        // Let the wrapper (a profiler) see a clean exit.
        let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
        if tokio::time::timeout(Duration::from_secs(120), child.wait()).await.is_err() {
            let _ = child.start_kill();
        }
    }
    let _ = child.wait().await;

    let n_created = created.load(Ordering::Relaxed);
    let per_order = |secs: f64| if n_created == 0 { 0.0 } else { secs * 1e6 / n_created as f64 };
    let r = OrdersReport {
        clients: args.clients,
        seconds: args.seconds,
        durability: args.durability.clone(),
        backend: place.describe(),
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
        loadgen: Some(args.loadgen),
        server_cpu_secs: server_cpu,
        server_cpu_load_secs: server_cpu_load,
        loadgen_cpu_secs: loadgen_cpu,
        cpu_us_per_order: per_order(server_cpu + loadgen_cpu),
        server_cpu_us_per_order: per_order(server_cpu),
        loadgen_cpu_us_per_order: per_order(loadgen_cpu),
        server_threads,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        println!(
            "overdue bench orders — {} clients for {} s, backend {}, durability {}, trigger {}",
            r.clients, r.seconds, r.backend, r.durability, r.trigger
        );
        println!("{:<36} {:>14}", "orders created", format!("{} ({:.0}/s)", r.created, r.created_per_sec));
        println!("{:<36} {:>14}", "orders paid", format!("{} ({:.0}/s)", r.paid, r.paid_per_sec));
        println!("{:<36} {:>14}", "closed on timeout", r.closed);
        println!("{:<36} {:>14}", "close lateness p50 / p99 / max", format!("{} / {} / {} ms", r.close_lateness_p50_ms, r.close_lateness_p99_ms, r.close_lateness_max_ms));
        println!("{:<36} {:>14}", "server peak RSS", format!("{:.1} MB", r.server_peak_rss_bytes as f64 / 1e6));
        println!("{:<36} {:>14}", "request errors", r.errors);
        println!("{:<36} {:>14}", "load generator", format!("{:?}", args.loadgen).to_lowercase());
        println!(
            "{:<36} {:>14}",
            "CPU per order (server + loadgen)",
            format!("{:.1} µs ({:.1} + {:.1})", r.cpu_us_per_order, r.server_cpu_us_per_order, r.loadgen_cpu_us_per_order)
        );
        println!(
            "{:<36} {:>14}",
            "CPU s: server (load phase) / loadgen",
            format!("{:.2} ({:.2}) / {:.2}", r.server_cpu_secs, r.server_cpu_load_secs, r.loadgen_cpu_secs)
        );
        let threads: Vec<String> = r.server_threads.iter().take(6).map(|(n, s)| format!("{n} {s:.2}")).collect();
        println!("{:<36} {}", "server CPU s by thread", threads.join(", "));
    }
    if let (Some(plots), Some(mut timeline)) = (plots, timeline) {
        let closed = crate::plot::event_rate("closed /s", &closed_at, &timeline);
        timeline.rates.push(closed);
        let title = format!("overdue bench orders: {} clients, {} s timeout ({}, trigger {})", r.clients, args.timeout_secs, r.backend, r.trigger);
        let written = [
            plots.json("orders.json", &r)?,
            plots.lateness("orders-lateness.svg", &format!("overdue bench orders: close lateness ({}, trigger {})", r.backend, r.trigger), &[crate::plot::Lateness { name: "closed on timeout", hist: &lateness }])?,
            plots.throughput("orders-throughput.svg", &title, "orders per second", &timeline)?,
        ];
        eprintln!("wrote {}", written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    if still_pending || early > 0 || mismatched > 0 {
        eprintln!(
            "FAIL: {} — the invariant does not hold",
            if still_pending {
                "orders were still pending a minute after their deadline"
            } else if early > 0 {
                "orders closed before their deadline"
            } else {
                "a closed order's updated_at differs from its closed event"
            }
        );
        return Ok(ExitCode::FAILURE);
    }
    Ok(ExitCode::SUCCESS)
}

/// The bench's shared counters.
#[derive(Clone)]
struct Counters {
    created: Arc<AtomicU64>,
    paid: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

/// Clock ticks per second of `/proc/*/stat` times (`USER_HZ`, 100 on Linux).
const CLK_TCK: f64 = 100.0;

/// utime + stime of a `/proc/.../stat` file, in seconds (0 if unreadable).
fn cpu_secs(stat_path: &str) -> f64 {
    std::fs::read_to_string(stat_path).ok().and_then(|s| parse_stat(&s)).map_or(0.0, |(_, secs)| secs)
}

/// `(comm, utime + stime seconds)` of one stat line; `comm` may contain spaces and parentheses.
fn parse_stat(s: &str) -> Option<(String, f64)> {
    let open = s.find('(')?;
    let close = s.rfind(')')?;
    let comm = s.get(open + 1..close)?.to_owned();
    let rest: Vec<&str> = s.get(close + 2..)?.split_whitespace().collect();
    // Fields 14 and 15 of the line; `rest` starts at field 3.
    let utime: f64 = rest.get(11)?.parse().ok()?;
    let stime: f64 = rest.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) / CLK_TCK))
}

/// CPU seconds per thread name of process `pid` (threads of one name summed).
fn thread_cpu(pid: u32) -> Vec<(String, f64)> {
    let mut out: Vec<(String, f64)> = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return out };
    for entry in dir.flatten() {
        let Some((name, secs)) = std::fs::read_to_string(entry.path().join("stat")).ok().and_then(|s| parse_stat(&s)) else {
            continue;
        };
        match out.iter_mut().find(|(n, _)| *n == name) {
            Some((_, total)) => *total += secs,
            None => out.push((name, secs)),
        }
    }
    out
}

/// The original load generator: reqwest clients on the bench's multi-threaded runtime.
async fn reqwest_load(http: &reqwest::Client, base: &str, clients: usize, ratio: f64, stop_at: Instant, k: Counters) {
    let mut tasks = Vec::new();
    for c in 0..clients {
        let (http, base, k) = (http.clone(), base.to_owned(), k.clone());
        tasks.push(tokio::spawn(async move {
            let mut n = 0u64;
            while Instant::now() < stop_at {
                n += 1;
                let product = PRODUCTS[(n % 3) as usize];
                let body = json!({"buyer": format!("b{c}-{n}"), "items": [{"product_id": product, "quantity": 1}]});
                let Ok(r) = http.post(format!("{base}/v1/orders")).json(&body).send().await else {
                    k.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                };
                if !r.status().is_success() {
                    k.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                k.created.fetch_add(1, Ordering::Relaxed);
                let Ok(order) = r.json::<Value>().await else { continue };
                if rand::rng().random_bool(ratio) {
                    let id = order.get("id").and_then(Value::as_str).unwrap_or_default().to_owned();
                    match http.post(format!("{base}/v1/orders/{id}/pay")).send().await {
                        Ok(r) if r.status().is_success() => {
                            k.paid.fetch_add(1, Ordering::Relaxed);
                        }
                        _ => {
                            k.errors.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                }
            }
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
}

const PRODUCTS: [&str; 3] = ["p1", "p2", "p3"];

/// The light load generator: `clients` keep-alive HTTP/1.1 connections driven by one
/// single-threaded runtime on its own OS thread, as wrk does. Requests are written into a reused
/// buffer; responses are parsed for real (status line, `Content-Length`, the JSON body's `id`).
async fn raw_load(port: u16, clients: usize, ratio: f64, stop_at: Instant, k: Counters) -> anyhow::Result<()> {
    let (done_tx, done_rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("bench-loadgen".to_owned())
        .spawn(move || {
            let result = tokio::runtime::Builder::new_current_thread().enable_all().build().map(|rt| {
                rt.block_on(async move {
                    let mut tasks = Vec::new();
                    for c in 0..clients {
                        tasks.push(tokio::spawn(raw_client(port, c, ratio, stop_at, k.clone())));
                    }
                    for t in tasks {
                        let _ = t.await;
                    }
                })
            });
            let _ = done_tx.send(result);
        })
        .context("starting the load generator thread")?;
    done_rx.await.context("the load generator thread died")?.context("building the load generator runtime")?;
    Ok(())
}

/// One HTTP/1.1 response: status code and body.
struct Response<'a> {
    status: u16,
    body: &'a [u8],
}

/// A keep-alive HTTP/1.1 connection with reused buffers.
struct Conn {
    stream: tokio::net::TcpStream,
    buf: Vec<u8>,
    /// Bytes of `buf` that belong to the current (or next) response.
    filled: usize,
    /// Where the next response starts in `buf` after the current one was handed out.
    consumed: usize,
}

impl Conn {
    async fn open(port: u16) -> std::io::Result<Conn> {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
        stream.set_nodelay(true)?;
        Ok(Conn { stream, buf: vec![0; 16 * 1024], filled: 0, consumed: 0 })
    }

    /// Sends `req` and reads one whole response.
    async fn call(&mut self, req: &[u8]) -> anyhow::Result<Response<'_>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        self.stream.write_all(req).await?;
        // Drop the previous response; keep anything read past it.
        self.buf.copy_within(self.consumed..self.filled, 0);
        self.filled -= self.consumed;
        self.consumed = 0;
        loop {
            if let Some((status, head_len, body_len)) = parse_head(&self.buf[..self.filled])? {
                let total = head_len + body_len;
                if total > self.buf.len() {
                    self.buf.resize(total, 0);
                }
                while self.filled < total {
                    let n = self.stream.read(&mut self.buf[self.filled..]).await?;
                    if n == 0 {
                        bail!("connection closed inside a response body");
                    }
                    self.filled += n;
                }
                self.consumed = total;
                return Ok(Response { status, body: &self.buf[head_len..total] });
            }
            if self.filled == self.buf.len() {
                bail!("response head larger than {} bytes", self.buf.len());
            }
            let n = self.stream.read(&mut self.buf[self.filled..]).await?;
            if n == 0 {
                bail!("connection closed before a response");
            }
            self.filled += n;
        }
    }
}

/// Parses a response head: `Some((status, head length, Content-Length))` once `\r\n\r\n` has
/// arrived. Chunked bodies are refused (the API always sends a length).
fn parse_head(b: &[u8]) -> anyhow::Result<Option<(u16, usize, usize)>> {
    let Some(end) = b.windows(4).position(|w| w == b"\r\n\r\n") else { return Ok(None) };
    let head = std::str::from_utf8(&b[..end]).context("response head is not UTF-8")?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    if !parts.next().is_some_and(|v| v.starts_with("HTTP/1.")) {
        bail!("not an HTTP/1.x response: {status_line:?}");
    }
    let status: u16 = parts.next().and_then(|c| c.parse().ok()).with_context(|| format!("bad status line {status_line:?}"))?;
    let mut length = None;
    for line in lines {
        let Some((name, value)) = line.split_once(':') else { bail!("bad header line {line:?}") };
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(value.trim().parse::<usize>().with_context(|| format!("bad content-length {value:?}"))?);
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            bail!("unexpected transfer-encoding {value:?}");
        }
    }
    Ok(Some((status, end + 4, length.unwrap_or(0))))
}

/// The `id` of a created order's JSON body.
#[derive(serde::Deserialize)]
struct CreatedOrder<'a> {
    #[serde(borrow)]
    id: std::borrow::Cow<'a, str>,
}

async fn raw_client(port: u16, c: usize, ratio: f64, stop_at: Instant, k: Counters) {
    use std::io::Write;
    let mut conn: Option<Conn> = None;
    let mut req = Vec::with_capacity(512);
    let mut body = Vec::with_capacity(128);
    let mut id = String::with_capacity(64);
    let mut n = 0u64;
    while Instant::now() < stop_at {
        if conn.is_none() {
            match Conn::open(port).await {
                Ok(c) => conn = Some(c),
                Err(_) => {
                    k.errors.fetch_add(1, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            }
        }
        let Some(cn) = conn.as_mut() else { continue };
        n += 1;
        body.clear();
        let _ = write!(body, r#"{{"buyer":"b{c}-{n}","items":[{{"product_id":"{}","quantity":1}}]}}"#, PRODUCTS[(n % 3) as usize]);
        req.clear();
        let _ = write!(
            req,
            "POST /v1/orders HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        req.extend_from_slice(&body);
        id.clear();
        match cn.call(&req).await {
            Ok(r) if r.status == 201 => match serde_json::from_slice::<CreatedOrder<'_>>(r.body) {
                Ok(o) => {
                    k.created.fetch_add(1, Ordering::Relaxed);
                    id.push_str(&o.id);
                }
                Err(_) => {
                    k.created.fetch_add(1, Ordering::Relaxed);
                    k.errors.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
            },
            Ok(_) => {
                k.errors.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            Err(_) => {
                k.errors.fetch_add(1, Ordering::Relaxed);
                conn = None;
                continue;
            }
        }
        if rand::rng().random_bool(ratio) {
            req.clear();
            let _ = write!(req, "POST /v1/orders/{id}/pay HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\n\r\n");
            match cn.call(&req).await {
                Ok(r) if r.status == 200 => {
                    k.paid.fetch_add(1, Ordering::Relaxed);
                }
                Ok(_) => {
                    k.errors.fetch_add(1, Ordering::Relaxed);
                }
                Err(_) => {
                    k.errors.fetch_add(1, Ordering::Relaxed);
                    conn = None;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_heads_parse_and_wait_for_the_blank_line() {
        let head = b"HTTP/1.1 201 Created\r\ncontent-type: application/json\r\nContent-Length: 12\r\n\r\n{\"id\":\"o-1\"}";
        assert_eq!(parse_head(head).expect("valid"), Some((201, head.len() - 12, 12)));
        assert_eq!(parse_head(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\n").expect("partial"), None);
        assert!(parse_head(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n").is_err());
        assert!(parse_head(b"SSH-2.0\r\n\r\n").is_err());
    }

    #[test]
    fn stat_lines_give_cpu_seconds() {
        let line = "42 (tokio-runtime-w) S 1 2 3 4 5 6 7 8 9 10 150 50 0 0 20 0 4 0 100 0 0";
        let (comm, secs) = parse_stat(line).expect("parses");
        assert_eq!(comm, "tokio-runtime-w");
        assert!((secs - 2.0).abs() < 1e-9, "{secs}");
    }
}
