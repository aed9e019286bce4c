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
//! 4. **burst** (with `--burst N`) — N timers, all due in the same millisecond a few seconds
//!    ahead (enough for scheduling to finish first), fired by an engine on the real clock; the
//!    lateness of every firing is recorded (issue 5's "100,000 due in one millisecond, p99 ≤ 1 s").
//! 5. **far** (with `--far N`) — N timers due a year ahead are scheduled; the process RSS is read
//!    afterwards: far-future timers must stay in the store, not in memory.
//!
//! With `--nodes N` (shared stores such as PostgreSQL) every phase runs N engines in this
//! process, each on its own connection pool and node identity, so they split the partitions and
//! the work exactly as N `overdue serve` processes would (on the same cores). Producers are spread
//! over the nodes; the report says how many firings each node handled. A `postgres://` URL
//! without `schema=` gets a fresh schema `overdue_bench_<ms>` so runs never mix.
//!
//! With `--trigger keyspace` (Redis key-expiry events at `--trigger-url`, default
//! `redis://127.0.0.1:6379`) every engine gets its own keyspace trigger, the SQLite store its
//! outbox, and the trigger URL a fresh `prefix=overdue-bench-<ms>` unless it names one. The fire
//! phase's timers were published an hour ahead, so their keys cannot expire during the run: the
//! backstop sweep fires them (the report counts how many; the rest are notices the first engine
//! left in the outbox, which the second publishes as already due). The bench then deletes the
//! keys, so the steady phase is measured without 1-hour TTL keys of its own in Redis; the far
//! phase's keys are deleted at the end.
//!
//! `--backend amqp://…?mode=dlx|delayed` (or `--trigger amqp --trigger-url amqp://…`) is the
//! same with RabbitMQ as the trigger: a fresh SQLite store with its outbox, and a fresh
//! `prefix=` whose exchanges and queues are deleted after the fire phase (the hour-long notices)
//! and at the end.
//!
//! With `--plot DIR` the report is also written to `DIR/bench.json`, beside two SVG plots
//! (see [`crate::plot`]): `bench-lateness.svg`, the lateness distributions of the steady and
//! burst phases (the fire phase is left out: its clock starts a second past the due time), and
//! `bench-throughput.svg`, timers scheduled and fired per second over the whole run with the
//! phases marked. The only cost on the measured path is one atomic add per schedule call.

use std::path::PathBuf;
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

use crate::trigger::TriggerChoice;
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
    /// Store URL; default: a fresh SQLite database in a temporary directory. A broker URL
    /// (`amqp://…?mode=dlx`) means that default store plus that broker as the trigger.
    #[arg(long, env = "OVERDUE_BACKEND")]
    backend: Option<String>,
    /// Trigger: wheel, heap, scan (in-process), keyspace (Redis key-expiry events at
    /// --trigger-url) or amqp (RabbitMQ at --trigger-url); an external trigger needs a store
    /// with an outbox: the default SQLite store gets one.
    #[arg(long, default_value = "wheel")]
    trigger: TriggerChoice,
    /// Where an external trigger connects (keyspace: a redis:// URL, default
    /// redis://127.0.0.1:6379; amqp: an amqp:// URL, default
    /// amqp://guest:guest@127.0.0.1:5672/%2f?mode=dlx); a fresh `prefix=` is added unless it has one.
    #[arg(long, env = "OVERDUE_TRIGGER_URL")]
    trigger_url: Option<String>,
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
    /// Timers due in one millisecond, fired on the real clock with their lateness recorded (0
    /// skips the phase).
    #[arg(long, default_value_t = 0)]
    burst: u64,
    /// Far-future timers to schedule before reading memory use (0 skips the phase).
    #[arg(long, default_value_t = 0)]
    far: u64,
    /// Engines sharing the store (each with its own pool and node identity); more than one
    /// needs a shared store such as postgres://.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    json: bool,
    /// Also write the report (bench.json) and SVG plots of lateness and throughput over time
    /// (bench-lateness.svg, bench-throughput.svg) into this directory, created if missing.
    #[arg(long, value_name = "DIR")]
    plot: Option<PathBuf>,
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
    nodes: usize,
    schedule_per_sec: f64,
    fire_per_sec: f64,
    fire_burst_seconds: f64,
    /// Firings of the fire phase handled by each node.
    fire_split: Vec<u64>,
    /// Of the fire phase's firings, those the backstop sweep fired (with an external trigger:
    /// every notice the schedule phase published, since those wait an hour).
    fire_backstop_rescued: u64,
    steady: Option<Steady>,
    burst: Option<Burst>,
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
    /// Firings of the steady phase handled by each node.
    split: Vec<u64>,
    /// Of those, fired by the backstop sweep (a wake-up the trigger missed), summed over nodes.
    backstop_rescued: u64,
    /// Wake-ups whose claim failed (already claimed elsewhere, replaced or cancelled).
    stale_dropped: u64,
}

#[derive(Debug, Default, Serialize)]
struct Burst {
    timers: u64,
    /// How far ahead of scheduling's start they were due.
    lead_ms: i64,
    /// False if scheduling was still running at the due time (lateness then includes it).
    scheduled_before_due: bool,
    lateness_p50_ms: u64,
    lateness_p90_ms: u64,
    lateness_p99_ms: u64,
    lateness_max_ms: u64,
    backstop_rescued: u64,
}

#[derive(Debug, Default, Serialize)]
struct Far {
    timers: u64,
    schedule_per_sec: f64,
    rss_bytes: u64,
    resident_in_memory: u64,
}

/// Counts completed firings (in all and per node), records their lateness, and wakes a waiter
/// at a target.
#[derive(Debug)]
struct Counter {
    done: AtomicU64,
    per_node: Vec<AtomicU64>,
    lateness: parking_lot::Mutex<hdrhistogram::Histogram<u64>>,
    notify: Notify,
}

impl Counter {
    fn new(nodes: usize) -> anyhow::Result<Counter> {
        Ok(Counter {
            done: AtomicU64::new(0),
            per_node: (0..nodes).map(|_| AtomicU64::new(0)).collect(),
            lateness: parking_lot::Mutex::new(hdrhistogram::Histogram::new_with_max(3_600_000, 3)?),
            notify: Notify::new(),
        })
    }

    fn split(&self) -> Vec<u64> {
        self.per_node.iter().map(|n| n.load(Ordering::Relaxed)).collect()
    }

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

/// Run-wide totals for `--plot`'s sampler: timers scheduled (added once per schedule call,
/// after it returned) and every phase's [`Counter`], whose `done` counts summed are the timers
/// fired — read by the sampler, so the handlers do nothing extra.
#[derive(Debug, Default)]
struct Tally {
    scheduled: AtomicU64,
    counters: parking_lot::Mutex<Vec<Arc<Counter>>>,
}

impl Tally {
    /// A fresh counter for a phase, registered for the sampler.
    fn counter(&self, nodes: usize) -> anyhow::Result<Arc<Counter>> {
        let c = Arc::new(Counter::new(nodes)?);
        self.counters.lock().push(c.clone());
        Ok(c)
    }

    fn fired(&self) -> u64 {
        self.counters.lock().iter().map(|c| c.done.load(Ordering::Relaxed)).sum()
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

async fn start_engine(
    store: Arc<dyn Store>,
    trigger: TriggerKind,
    external: Option<Arc<dyn overdue::ExternalTrigger>>,
    offset_ms: i64,
    counter: Arc<Counter>,
    node: usize,
) -> anyhow::Result<Engine> {
    let clock: Arc<dyn overdue::Clock> = if offset_ms == 0 { system_clock() } else { Arc::new(OffsetClock { offset_ms }) };
    let config = EngineConfig { trigger, ..EngineConfig::default() };
    let queue = QueueConfig { concurrency: 4096, ..QueueConfig::default() };
    let mut builder = Engine::builder(store);
    if let Some(t) = external {
        builder = builder.external_trigger(t);
    }
    let engine = builder
        .clock(clock)
        .config(config)
        .handler(QUEUE, queue, move |f: Firing| {
            let c = counter.clone();
            async move {
                c.lateness.lock().saturating_record(f.lateness_ms() as u64);
                if let Some(n) = c.per_node.get(node) {
                    n.fetch_add(1, Ordering::Relaxed);
                }
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
#[allow(clippy::too_many_arguments)]
async fn produce(engines: &[Arc<Engine>], n: u64, producers: usize, batch: usize, due: impl Fn(u64) -> i64 + Send + Sync + 'static, prefix: &str, pb: &ProgressBar, tally: &Arc<Tally>) -> anyhow::Result<f64> {
    let next = Arc::new(AtomicU64::new(0));
    let due = Arc::new(due);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for p in 0..producers.max(1) {
        let engine = engines[p % engines.len()].clone();
        let (next, due, pb, prefix, tally) = (next.clone(), due.clone(), pb.clone(), prefix.to_owned(), tally.clone());
        tasks.push(tokio::spawn(async move {
            loop {
                let start = next.fetch_add(batch as u64, Ordering::Relaxed);
                if start >= n {
                    return Ok::<(), overdue::Error>(());
                }
                let end = (start + batch as u64).min(n);
                let specs: Vec<TimerSpec> = (start..end).map(|i| TimerSpec::new(QUEUE, format!("{prefix}{i}"), due(i))).collect();
                engine.schedule_batch(specs).await?;
                tally.scheduled.fetch_add(end - start, Ordering::Relaxed);
                pb.inc(end - start);
            }
        }));
    }
    for t in tasks {
        t.await.context("producer task")??;
    }
    Ok(n as f64 / started.elapsed().as_secs_f64())
}

pub async fn run(mut args: BenchArgs) -> anyhow::Result<ExitCode> {
    if let Some(BenchKind::Orders(o)) = args.kind {
        return crate::bench_orders::run(o).await;
    }
    // A broker URL as the backend: the default SQLite store (outbox on) and that trigger.
    if let Some(t) = args.backend.as_deref().and_then(TriggerChoice::for_backend_url) {
        if args.trigger_url.is_some() {
            bail!("--backend {} names the trigger's broker already; drop --trigger-url", crate::trigger::redact(args.backend.as_deref().unwrap_or("")));
        }
        args.trigger = t;
        args.trigger_url = args.backend.take();
    }
    if args.batch == 0 || args.batch > overdue::limits::MAX_BATCH {
        bail!("--batch must be between 1 and {}", overdue::limits::MAX_BATCH);
    }
    if args.timers == 0 {
        bail!("--timers must be at least 1");
    }
    if args.nodes == 0 || args.nodes > 16 {
        bail!("--nodes must be between 1 and 16");
    }
    // Before any work: a --plot directory that cannot be written fails the run now.
    let plots = args.plot.as_deref().map(crate::plot::PlotDir::create).transpose()?;
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    // A postgres URL without a schema gets a fresh one, dropped again at the end (the same
    // place `bench orders` makes for itself).
    let own_schema = match &args.backend {
        Some(u) if (u.starts_with("postgres://") || u.starts_with("postgresql://")) && !u.contains("schema=") => {
            Some(crate::bench_orders::Place::fresh(u, tmp.path(), "full").await?)
        }
        _ => None,
    };
    let url = match (&own_schema, &args.backend) {
        (Some(place), _) => place.url().to_owned(),
        (None, Some(u)) => u.clone(),
        (None, None) => format!("sqlite:{}", tmp.path().join("bench.db").display()),
    };
    let url = args.trigger.store_url(&url);
    let trigger_url = {
        let u = args.trigger_url.clone().unwrap_or_else(|| args.trigger.default_url().to_owned());
        if args.trigger.is_external() && !u.contains("prefix=") {
            let sep = if u.contains('?') { '&' } else { '?' };
            format!("{u}{sep}prefix=overdue-bench-{}", overdue::SystemClock.now_ms())
        } else {
            u
        }
    };
    // Fails here, before any work, on a bad trigger URL.
    args.trigger.external(&trigger_url)?;
    let quiet = args.json;
    let mut stores: Vec<Arc<dyn Store>> = Vec::with_capacity(args.nodes);
    for _ in 0..args.nodes {
        stores.push(overdue::open(&url).await.with_context(|| format!("opening {url}"))?);
    }
    if args.nodes > 1 && !stores[0].capabilities().shared {
        bail!("--nodes {} needs a store that several nodes can share; {} is not", args.nodes, stores[0].capabilities().name);
    }
    let mut report = Report {
        backend: url.clone(),
        trigger: if args.trigger.is_external() {
            format!("{} ({})", args.trigger, crate::trigger::redact(&trigger_url))
        } else {
            args.trigger.to_string()
        },
        timers: args.timers,
        producers: args.producers,
        batch: args.batch,
        nodes: args.nodes,
        ..Report::default()
    };
    let start_all = |offset_ms: i64, counter: Arc<Counter>| {
        let stores = stores.clone();
        let (trigger, trigger_url) = (args.trigger, trigger_url.clone());
        async move {
            let mut engines = Vec::with_capacity(stores.len());
            for (i, store) in stores.into_iter().enumerate() {
                let external = trigger.external(&trigger_url)?;
                engines.push(Arc::new(start_engine(store, trigger.kind(), external, offset_ms, counter.clone(), i).await?));
            }
            anyhow::Ok(engines)
        }
    };
    let stop_all = |engines: Vec<Arc<Engine>>| async move {
        for e in engines {
            e.shutdown(Duration::from_secs(5)).await;
        }
    };

    let tally = Arc::new(Tally::default());
    let sampler = match &plots {
        Some(_) => {
            let t = tally.clone();
            Some(crate::plot::Sampler::start(&["scheduled /s", "fired /s"], move || vec![t.scheduled.load(Ordering::Relaxed), t.fired()])?)
        }
        None => None,
    };
    let mark = |label: &str| {
        if let Some(s) = &sampler {
            s.mark(label);
        }
    };
    let (mut steady_lateness, mut burst_lateness) = (None, None);

    // 1. schedule
    mark("schedule");
    let counter = tally.counter(args.nodes)?;
    let engines = start_all(0, counter.clone()).await?;
    let due_at = overdue::SystemClock.now_ms() + HOUR_MS;
    let pb = bar(args.timers, "schedule", quiet);
    report.schedule_per_sec = produce(&engines, args.timers, args.producers, args.batch, move |_| due_at, "t", &pb, &tally).await?;
    pb.finish_and_clear();
    stop_all(engines).await;

    // 2. fire: a clock an hour and a second ahead sees everything due at once.
    mark("fire");
    let engines = start_all(HOUR_MS + 1_000, counter.clone()).await?;
    let pb = bar(args.timers, "fire", quiet);
    let started = Instant::now();
    counter.wait_for(args.timers, &pb).await;
    let secs = started.elapsed().as_secs_f64();
    pb.finish_and_clear();
    report.fire_burst_seconds = secs;
    report.fire_per_sec = args.timers as f64 / secs;
    report.fire_split = counter.split();
    report.fire_backstop_rescued = engines.iter().map(|e| e.stats().backstop_rescued).sum();
    stop_all(engines).await;
    // Their notices' keys would wait out their hour in Redis (and slow its expiry cycle).
    args.trigger.purge(&trigger_url).await.context("deleting the fire phase's expiry keys")?;

    // 3. steady rate
    if args.rate > 0 && args.rate_seconds > 0 {
        mark("steady");
        let counter = tally.counter(args.nodes)?;
        let engines = start_all(0, counter.clone()).await?;
        let total = args.rate * args.rate_seconds;
        let pb = bar(total, "steady", quiet);
        // Every 10 ms, schedule what brings the total to `rate × elapsed` (exact over the run
        // for any rate, not rounded per slice), each due one second later; the slices go to
        // the nodes in turn.
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
            let (e, tally) = (engines[slices as usize % engines.len()].clone(), tally.clone());
            inflight.push(tokio::spawn(async move {
                e.schedule_batch(specs).await?;
                tally.scheduled.fetch_add(n, Ordering::Relaxed);
                Ok::<(), overdue::Error>(())
            }));
            sent += n;
            pb.set_position(counter.done.load(Ordering::Relaxed));
        }
        for t in inflight {
            t.await.context("steady producer")??;
        }
        counter.wait_for(total, &pb).await;
        pb.finish_and_clear();
        let h = counter.lateness.lock().clone();
        report.steady = Some(Steady {
            rate_per_sec: args.rate,
            seconds: args.rate_seconds,
            fired: h.len(),
            lateness_p50_ms: h.value_at_quantile(0.50),
            lateness_p90_ms: h.value_at_quantile(0.90),
            lateness_p99_ms: h.value_at_quantile(0.99),
            lateness_max_ms: h.max(),
            split: counter.split(),
            backstop_rescued: engines.iter().map(|e| e.stats().backstop_rescued).sum(),
            stale_dropped: engines.iter().map(|e| e.stats().stale_dropped).sum(),
        });
        steady_lateness = Some(h);
        stop_all(engines).await;
    }

    // 4. burst: everything due in one millisecond, on the real clock.
    if args.burst > 0 {
        mark("burst");
        let counter = tally.counter(args.nodes)?;
        let engines = start_all(0, counter.clone()).await?;
        let pb = bar(args.burst, "burst", quiet);
        // Lead: 2 s plus 1.5 × the time scheduling took in phase 1 at its measured rate.
        let lead_ms = 2_000 + (args.burst as f64 * 1_500.0 / report.schedule_per_sec.max(1_000.0)) as i64;
        let due = overdue::SystemClock.now_ms() + lead_ms;
        produce(&engines, args.burst, args.producers, args.batch, move |_| due, "b", &pb, &tally).await?;
        let scheduled_before_due = overdue::SystemClock.now_ms() < due;
        counter.wait_for(args.burst, &pb).await;
        pb.finish_and_clear();
        let h = counter.lateness.lock().clone();
        report.burst = Some(Burst {
            timers: args.burst,
            lead_ms,
            scheduled_before_due,
            lateness_p50_ms: h.value_at_quantile(0.50),
            lateness_p90_ms: h.value_at_quantile(0.90),
            lateness_p99_ms: h.value_at_quantile(0.99),
            lateness_max_ms: h.max(),
            backstop_rescued: engines.iter().map(|e| e.stats().backstop_rescued).sum(),
        });
        burst_lateness = Some(h);
        stop_all(engines).await;
    }

    // 5. far-future timers and memory
    if args.far > 0 {
        mark("far");
        let counter = tally.counter(args.nodes)?;
        let engines = start_all(0, counter).await?;
        let pb = bar(args.far, "far", quiet);
        let year = overdue::limits::YEAR_MS;
        let now = overdue::SystemClock.now_ms();
        let rate = produce(&engines, args.far, args.producers, args.batch.clamp(1000, overdue::limits::MAX_BATCH),
            move |i| now + year + (i as i64 % 86_400_000), "far", &pb, &tally).await?;
        pb.finish_and_clear();
        let (rss, _) = rss_bytes();
        let resident = engines.iter().map(|e| e.stats().resident).sum();
        report.far = Some(Far { timers: args.far, schedule_per_sec: rate, rss_bytes: rss, resident_in_memory: resident });
        stop_all(engines).await;
    }
    report.peak_rss_bytes = rss_bytes().1;
    let timeline = sampler.map(crate::plot::Sampler::finish);
    drop(stores);
    if let Err(e) = args.trigger.purge(&trigger_url).await {
        eprintln!("warning: could not delete the trigger's remaining keys: {e:#}");
    }
    if let Some(place) = own_schema {
        place.drop_fresh().await;
    }

    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if let Some(plots) = plots {
        let written = write_plots(&plots, &report, steady_lateness.as_ref(), burst_lateness.as_ref(), &timeline.unwrap_or_default())?;
        eprintln!("wrote {}", written.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", "));
    }
    Ok(ExitCode::SUCCESS)
}

/// `--plot`: the report and its two plots.
fn write_plots(
    plots: &crate::plot::PlotDir,
    r: &Report,
    steady: Option<&hdrhistogram::Histogram<u64>>,
    burst: Option<&hdrhistogram::Histogram<u64>>,
    timeline: &crate::plot::Timeline,
) -> anyhow::Result<Vec<PathBuf>> {
    let store = r.backend.split(':').next().unwrap_or("store");
    // An external trigger's entry carries its URL; the name is enough for a title.
    let trigger = r.trigger.split(' ').next().unwrap_or("");
    let steady_name = r.steady.as_ref().map(|s| format!("steady {} /s for {} s", thousands(s.rate_per_sec), s.seconds));
    let burst_name = r.burst.as_ref().map(|b| format!("burst of {} due in one ms", thousands(b.timers)));
    let mut series = Vec::new();
    if let (Some(hist), Some(name)) = (steady, steady_name.as_deref()) {
        series.push(crate::plot::Lateness { name, hist });
    }
    if let (Some(hist), Some(name)) = (burst, burst_name.as_deref()) {
        series.push(crate::plot::Lateness { name, hist });
    }
    let mut written = vec![plots.json("bench.json", r)?];
    if !series.is_empty() {
        let title = format!("overdue bench: firing lateness ({store}, trigger {trigger})");
        written.push(plots.lateness("bench-lateness.svg", &title, &series)?);
    }
    let title = format!("overdue bench: throughput over time ({store}, trigger {trigger})");
    written.push(plots.throughput("bench-throughput.svg", &title, "timers per second", timeline)?);
    Ok(written)
}

fn print_table(r: &Report) {
    let mb = |b: u64| format!("{:.1} MB", b as f64 / 1e6);
    println!("overdue bench — backend {} — trigger {} — {} node(s)", r.backend, r.trigger, r.nodes);
    println!("{:<34} {:>18}", "metric", "value");
    println!("{:<34} {:>18}", format!("schedule ({} producers, batch {})", r.producers, r.batch), format!("{} /s", thousands(r.schedule_per_sec as u64)));
    println!("{:<34} {:>18}", format!("fire ({} due at once)", thousands(r.timers)), format!("{} /s", thousands(r.fire_per_sec as u64)));
    if r.nodes > 1 {
        println!("{:<34} {:>18}", "  fired per node", join(&r.fire_split));
    }
    if r.fire_backstop_rescued > 0 {
        println!("{:<34} {:>18}", "  of which by the backstop", thousands(r.fire_backstop_rescued));
    }
    if let Some(s) = &r.steady {
        println!("{:<34} {:>18}", format!("steady {} /s for {} s", thousands(s.rate_per_sec), s.seconds), format!("{} fired", thousands(s.fired)));
        println!("{:<34} {:>18}", "  lateness p50 / p90", format!("{} / {} ms", s.lateness_p50_ms, s.lateness_p90_ms));
        println!("{:<34} {:>18}", "  lateness p99 / max", format!("{} / {} ms", s.lateness_p99_ms, s.lateness_max_ms));
        if r.nodes > 1 {
            println!("{:<34} {:>18}", "  fired per node", join(&s.split));
        }
        println!("{:<34} {:>18}", "  backstop rescues / stale wake-ups", format!("{} / {}", s.backstop_rescued, s.stale_dropped));
    }
    if let Some(b) = &r.burst {
        let note = if b.scheduled_before_due { "" } else { " (scheduling overran the due time)" };
        println!("{:<34} {:>18}", format!("burst {} due in one ms{note}", thousands(b.timers)), format!("lead {} ms", b.lead_ms));
        println!("{:<34} {:>18}", "  lateness p50 / p90", format!("{} / {} ms", b.lateness_p50_ms, b.lateness_p90_ms));
        println!("{:<34} {:>18}", "  lateness p99 / max", format!("{} / {} ms", b.lateness_p99_ms, b.lateness_max_ms));
    }
    if let Some(f) = &r.far {
        println!("{:<34} {:>18}", "far-future timers stored", thousands(f.timers));
        println!("{:<34} {:>18}", "  scheduled at", format!("{} /s", thousands(f.schedule_per_sec as u64)));
        println!("{:<34} {:>18}", "  RSS afterwards", mb(f.rss_bytes));
        println!("{:<34} {:>18}", "  held in memory", thousands(f.resident_in_memory));
    }
    println!("{:<34} {:>18}", "peak RSS", mb(r.peak_rss_bytes));
}

fn join(v: &[u64]) -> String {
    v.iter().map(|n| thousands(*n)).collect::<Vec<_>>().join(" / ")
}

