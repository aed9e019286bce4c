//! End to end through the broker: an engine over a fresh SQLite store (outbox on) and the
//! RocketMQ trigger schedules N timers due DUE_MS from now, spread over SPREAD_MS, and reports
//! how fast they were relayed and fired and how late: `cargo run --release -p overdue-rocketmq
//! --example rocketmq_fire_rate -- [N] [DUE_MS] [SPREAD_MS] [MODE]` against the name server on
//! 127.0.0.1:9876 (a fresh prefix, its topic deleted afterwards).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use overdue_core::{Clock, ExternalTrigger, Firing, Outcome, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_rocketmq::{Mode, RocketOptions, RocketTrigger};
use overdue_sql::{SqliteOptions, SqliteStore};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> overdue_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let due: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let spread: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(5_000);
    let mode = match args.next().as_deref() {
        Some("levels") => Mode::Levels,
        _ => Mode::Timer,
    };
    let dir = tempfile::tempdir().map_err(|e| overdue_core::Error::Config(e.to_string()))?;
    let store = SqliteStore::open(dir.path().join("o.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() }).await?;
    let prefix = format!("overdue-fire-rate-{}", std::process::id());
    let trigger = RocketTrigger::new(RocketOptions { prefix, mode, ..RocketOptions::default() });
    let late: Arc<Mutex<Vec<i64>>> = Arc::default();
    let rec = late.clone();
    let engine = Engine::builder(Arc::new(store))
        .clock(Arc::new(SystemClock))
        .config(EngineConfig::default())
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig { jitter: 0.0, ..QueueConfig::default() }, move |f: Firing| {
            if let Ok(mut l) = rec.lock() {
                l.push(f.fired_at - f.due_at);
            }
            async { Outcome::Done }
        })
        .start()
        .await?;
    while !trigger.consuming() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t0 = SystemClock.now_ms();
    let started = Instant::now();
    let specs: Vec<TimerSpec> =
        (0..n).map(|i| TimerSpec::new("q", format!("k{i}"), t0 + due + (i as i64 * spread) / n.max(1) as i64)).collect();
    for chunk in specs.chunks(1_000) {
        engine.schedule_batch(chunk.to_vec()).await?;
    }
    let scheduled = started.elapsed().as_secs_f64();
    while engine.stats().published < n as u64 {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let relayed = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_millis((due + spread) as u64 + 120_000);
    while (engine.stats().completed as usize) < n && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let mut l = late.lock().map(|l| l.clone()).unwrap_or_default();
    l.sort_unstable();
    let q = |p: f64| l.get(((l.len() as f64 - 1.0) * p) as usize).copied().unwrap_or(-1);
    let stats = engine.stats();
    println!(
        "{mode:?}: {n} timers due in {due}..{} ms: scheduled in {scheduled:.2} s, relayed (SEND_OK) by {relayed:.2} s ({:.0} /s); fired {} (backstop {}), lateness p50 {} ms p99 {} ms max {} ms; trigger {:?}",
        due + spread,
        n as f64 / relayed,
        l.len(),
        stats.backstop_rescued,
        q(0.5),
        q(0.99),
        l.last().copied().unwrap_or(-1),
        trigger.stats()
    );
    engine.shutdown(Duration::from_secs(5)).await;
    trigger.purge().await?;
    trigger.close().await;
    Ok(())
}
