//! `overdue bench`: schedule throughput, fire throughput, lateness at a steady rate, and memory
//! with many far-future timers, on any backend.
//!
//! Phases (each reported on its own line):
//! 1. **schedule** — `producers` tasks schedule `timers` timers durably (batches of `batch`),
//!    all due an hour ahead, through the engine (validation, store, index).
//! 2. **fire** — a second engine whose clock runs an hour and a second ahead sees all of them
//!    due at once and fires them as fast as it can: claim, handler, settle.
//! 3. **steady** — for `rate_seconds`, timers are scheduled at `rate` per second, each due one
//!    second after it is scheduled; the lateness of every firing is recorded.
//! 4. **far** (with `--far N`) — N timers due a year ahead are scheduled; the process RSS is read
//!    afterwards: far-future timers must stay in the store, not in memory.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};
use overdue::{Clock, Engine, EngineConfig, Firing, Outcome, QueueConfig, Store, TimerSpec, TriggerKind};
use serde::Serialize;
use tokio::sync::Notify;

use crate::util::{OffsetClock, rss_bytes, system_clock, thousands};

const QUEUE: &str = "bench";
const HOUR_MS: i64 = 3_600_000;

/// Options of `overdue bench`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// `orders`: the order service over HTTP instead of the bare engine.
    #[command(subcommand)]
    kind: Option<BenchKind>,
    /// Store URL; default: a fresh SQLite database in a temporary directory.
    #[arg(long, env = "OVERDUE_BACKEND")]
    backend: Option<String>,
    /// Trigger: wheel, heap or scan.
    #[arg(long, default_value = "wheel")]
    trigger: TriggerKind,
    /// Timers scheduled (phase 1) and then fired (phase 2).
    #[arg(long, default_value_t = 200_000)]
    timers: u64,
    /// Concurrent producer tasks.
    #[arg(long, default_value_t = 8)]
    producers: usize,
    /// Timers per schedule call (1 = one call per timer).
    #[arg(long, default_value_t = 100)]
    batch: usize,
    /// Fires per second in the steady phase (0 skips it).
    #[arg(long, default_value_t = 10_000)]
    rate: u64,
    /// Length of the steady phase, seconds.
    #[arg(long, default_value_t = 10)]
    rate_seconds: u64,
    /// Far-future timers to schedule before reading memory use (0 skips the phase).
    #[arg(long, default_value_t = 0)]
    far: u64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
}

/// Benchmarks other than the engine's.
#[derive(Debug, clap::Subcommand)]
enum BenchKind {
    /// Concurrent HTTP clients create and pay orders against `overdue serve`.
    Orders(crate::bench_orders::OrdersBenchArgs),
}

#[derive(Debug, Default, Serialize)]
struct Report {
    backend: String,
    trigger: String,
    timers: u64,
    producers: usize,
    batch: usize,
    schedule_per_sec: f64,
    fire_per_sec: f64,
    fire_burst_seconds: f64,
    steady: Option<Steady>,
    far: Option<Far>,
    peak_rss_bytes: u64,
}

#[derive(Debug, Default, Serialize)]
struct Steady {
    rate_per_sec: u64,
    seconds: u64,
    fired: u64,
    lateness_p50_ms: u64,
    lateness_p90_ms: u64,
    lateness_p99_ms: u64,
    lateness_max_ms: u64,
}

#[derive(Debug, Default, Serialize)]
struct Far {
    timers: u64,
    schedule_per_sec: f64,
    rss_bytes: u64,
    resident_in_memory: u64,
}

/// Counts completed firings and wakes a waiter at a target.
#[derive(Debug, Default)]
struct Counter {
    done: AtomicU64,
    notify: Notify,
}

impl Counter {
    async fn wait_for(&self, target: u64, bar: &ProgressBar) {
        loop {
            let n = self.done.load(Ordering::Relaxed);
            bar.set_position(n);
            if n >= target {
                return;
            }
            let _ = tokio::time::timeout(Duration::from_millis(100), self.notify.notified()).await;
        }
    }
}

fn bar(len: u64, what: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let pb = ProgressBar::new(len);
    let style = ProgressStyle::with_template("{msg:>10} [{bar:40}] {pos}/{len} {per_sec} eta {eta}")
        .unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style.progress_chars("=> "));
    pb.set_message(what.to_owned());
    pb
}

async fn start_engine(store: Arc<dyn Store>, trigger: TriggerKind, offset_ms: i64, counter: Arc<Counter>) -> anyhow::Result<Engine> {
    let clock: Arc<dyn overdue::Clock> = if offset_ms == 0 { system_clock() } else { Arc::new(OffsetClock { offset_ms }) };
    let config = EngineConfig { trigger, ..EngineConfig::default() };
    let queue = QueueConfig { concurrency: 4096, ..QueueConfig::default() };
    let engine = Engine::builder(store)
        .clock(clock)
        .config(config)
        .handler(QUEUE, queue, move |_f: Firing| {
            let c = counter.clone();
            async move {
                c.done.fetch_add(1, Ordering::Relaxed);
                c.notify.notify_one();
                Outcome::Done
            }
        })
        .start()
        .await?;
    Ok(engine)
}

/// Schedules `n` timers from `producers` tasks in batches; returns timers per second.
async fn produce(engine: &Arc<Engine>, n: u64, producers: usize, batch: usize, due: impl Fn(u64) -> i64 + Send + Sync + 'static, prefix: &str, pb: &ProgressBar) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let due = Arc::new(due);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..producers.max(1) {
        let (engine, next, due, pb, prefix) = (engine.clone(), next.clone(), due.clone(), pb.clone(), prefix.to_owned());
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(batch as u64, Ordering::Relaxed);
                if start >= n {
                    return Ok::<(), overdue::Error>(());
                }
                let end = (start + batch as u64).min(n);
                let specs: Vec<TimerSpec> = (start..end).map(|i| TimerSpec::new(QUEUE, format!("{prefix}{i}"), due(i))).collect();
                engine.schedule_batch(specs).await?;
                pb.inc(end - start);
            }
        }));
    }
    for t in tasks {
        t.await.context("producer task")??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(BenchKind::Orders(o)) = args.kind {
        return crate::bench_orders::run(o).await;
    }
    if args.batch == 0 || args.batch > overdue::limits::MAX_BATCH {
        bail!("--batch must be between 1 and {}", overdue::limits::MAX_BATCH);
    }
    if args.timers == 0 {
        bail!("--timers must be at least 1");
    }
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let url = match &args.backend {
        Some(u) => u.clone(),
        None => format!("sqlite:{}", tmp.path().join("bench.db").display()),
    };
    let quiet = args.json;
    let store = overdue::open(&url).await.with_context(|| format!("opening {url}"))?;
    let mut report = Report {
        backend: url.clone(),
        trigger: args.trigger.to_string(),
        timers: args.timers,
        producers: args.producers,
        batch: args.batch,
        ..Report::default()
    };

    // 1. schedule
    let counter = Arc::new(Counter::default());
    let engine = Arc::new(start_engine(store.clone(), args.trigger, 0, counter.clone()).await?);
    let due_at = overdue::SystemClock.now_ms() + HOUR_MS;
    let pb = bar(args.timers, "schedule", quiet);
    report.schedule_per_sec = produce(&engine, args.timers, args.producers, args.batch, move |_| due_at, "t", &pb).await?;
    pb.finish_and_clear();
    engine.shutdown(Duration::from_secs(5)).await;

    // 2. fire: a clock an hour and a second ahead sees everything due at once.
    let engine = start_engine(store.clone(), args.trigger, HOUR_MS + 1_000, counter.clone()).await?;
    let pb = bar(args.timers, "fire", quiet);
    let started = Instant::now();
    counter.wait_for(args.timers, &pb).await;
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    report.fire_burst_seconds = secs;
    report.fire_per_sec = args.timers as f64 / secs;
    engine.shutdown(Duration::from_secs(5)).await;

    // 3. steady rate
    if args.rate > 0 && args.rate_seconds > 0 {
        let counter = Arc::new(Counter::default());
        let engine = Arc::new(start_engine(store.clone(), args.trigger, 0, counter.clone()).await?);
        let total = args.rate * args.rate_seconds;
        let pb = bar(total, "steady", quiet);
        // Every 10 ms, schedule what brings the total to `rate × elapsed` (exact over the run
        // for any rate, not rounded per slice), each due one second later.
        const SLICE_MS: u64 = 10;
        let mut slices = 0u64;
        let mut ticker = tokio::time::interval(Duration::from_millis(SLICE_MS));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
        let mut sent = 0u64;
        let mut inflight = Vec::new();
        while sent < total {
            ticker.tick().await;
            slices += 1;
            let n = (args.rate * slices * SLICE_MS / 1000).min(total) - sent;
            if n == 0 {
                continue;
            }
            let due = overdue::SystemClock.now_ms() + 1_000;
            let specs: Vec<TimerSpec> = (sent..sent + n).map(|i| TimerSpec::new(QUEUE, format!("s{i}"), due)).collect();
            let e = engine.clone();
            inflight.push(tokio::spawn(async move { e.schedule_batch(specs).await }));
            sent += n;
            pb.set_position(counter.done.load(Ordering::Relaxed));
        }
        for t in inflight {
            t.await.context("steady producer")??;
        }
        counter.wait_for(total, &pb).await;
        pb.finish_and_clear();
        let s = engine.stats().lateness;
        report.steady = Some(Steady {
            rate_per_sec: args.rate,
            seconds: args.rate_seconds,
            fired: s.count,
            lateness_p50_ms: s.p50_ms,
            lateness_p90_ms: s.p90_ms,
            lateness_p99_ms: s.p99_ms,
            lateness_max_ms: s.max_ms,
        });
        engine.shutdown(Duration::from_secs(5)).await;
    }

    // 4. far-future timers and memory
    if args.far > 0 {
        let counter = Arc::new(Counter::default());
        let engine = Arc::new(start_engine(store.clone(), args.trigger, 0, counter).await?);
        let pb = bar(args.far, "far", quiet);
        let year = overdue::limits::YEAR_MS;
        let now = overdue::SystemClock.now_ms();
        let rate = produce(&engine, args.far, args.producers, args.batch.clamp(1000, overdue::limits::MAX_BATCH),
            move |i| now + year + (i as i64 % 86_400_000), "far", &pb).await?;
        pb.finish_and_clear();
        let (rss, _) = rss_bytes();
        report.far = Some(Far { timers: args.far, schedule_per_sec: rate, rss_bytes: rss, resident_in_memory: engine.stats().resident });
        engine.shutdown(Duration::from_secs(5)).await;
    }
    report.peak_rss_bytes = rss_bytes().1;
    drop(store);

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(r: &Report) {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    println!("overdue bench — backend {} — trigger {}", r.backend, r.trigger);
    println!("{:<34} {:>18}", "metric", "value");
    println!("{:<34} {:>18}", format!("schedule ({} producers, batch {})", r.producers, r.batch), format!("{} /s", thousands(r.schedule_per_sec as u64)));
    println!("{:<34} {:>18}", format!("fire ({} due at once)", thousands(r.timers)), format!("{} /s", thousands(r.fire_per_sec as u64)));
    if let Some(s) = &r.steady {
        println!("{:<34} {:>18}", format!("steady {} /s for {} s", thousands(s.rate_per_sec), s.seconds), format!("{} fired", thousands(s.fired)));
        println!("{:<34} {:>18}", "  lateness p50 / p90", format!("{} / {} ms", s.lateness_p50_ms, s.lateness_p90_ms));
        println!("{:<34} {:>18}", "  lateness p99 / max", format!("{} / {} ms", s.lateness_p99_ms, s.lateness_max_ms));
    }
    if let Some(f) = &r.far {
        println!("{:<34} {:>18}", "far-future timers stored", thousands(f.timers));
        println!("{:<34} {:>18}", "  scheduled at", format!("{} /s", thousands(f.schedule_per_sec as u64)));
        println!("{:<34} {:>18}", "  RSS afterwards", mb(f.rss_bytes));
        println!("{:<34} {:>18}", "  held in memory", thousands(f.resident_in_memory));
    }
    println!("{:<34} {:>18}", "peak RSS", mb(r.peak_rss_bytes));
}
