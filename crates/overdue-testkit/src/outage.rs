//! One scenario for every shared store: the server goes away mid-run and comes back.
//!
//! [`outage`] runs an engine on the store, keeps scheduling (20 timers every 50 ms, due 0.5–2.5 s
//! later) while timers come due, calls `stop` (the server goes away) and after [`OUTAGE`]
//! `start` (it is back), then checks that every timer whose `schedule` returned Ok fired, none
//! early, that the outage showed in the engine's store health and cleared afterwards. It waits in
//! real time: the outage is real. Used by the PostgreSQL and MySQL `database_restart` tests,
//! each with a private server it can stop without disturbing the tests beside it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use overdue_core::{Clock, Firing, Outcome, Store, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig, TriggerKind};
use parking_lot::Mutex;

/// How long the server stays down.
pub const OUTAGE: Duration = Duration::from_secs(5);

/// Runs the scenario (see the module docs); `what` names the store in messages.
pub async fn outage(what: &str, store: Arc<dyn Store>, stop: impl FnOnce(), start: impl FnOnce()) {
    let fired: Arc<Mutex<HashMap<String, (i64, i64)>>> = Arc::default();
    let f2 = fired.clone();
    let engine = Arc::new(
        Engine::builder(store.clone())
            .config(EngineConfig { trigger: TriggerKind::Wheel, lease: Duration::from_secs(10), ..EngineConfig::default() })
            .default_queue_config(QueueConfig { timeout: Duration::from_secs(5), ..QueueConfig::default() })
            .handler(
                "q",
                QueueConfig { timeout: Duration::from_secs(5), ..QueueConfig::default() },
                move |f: Firing| {
                    let fired = f2.clone();
                    async move {
                        fired.lock().entry(f.key.clone()).or_insert((f.due_at, f.fired_at));
                        Outcome::Done
                    }
                },
            )
            .start()
            .await
            .expect("engine"),
    );

    // A producer schedules 20 timers every 50 ms, each due 0.5-2.5 s later, and remembers the
    // ones whose schedule returned Ok. It runs across the outage.
    let acked: Arc<Mutex<Vec<(String, i64)>>> = Arc::default();
    let failed = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let producing = Duration::from_secs(4) + OUTAGE + Duration::from_secs(3);
    let producer = {
        let (engine, acked, failed) = (engine.clone(), acked.clone(), failed.clone());
        tokio::spawn(async move {
            let started = Instant::now();
            let mut i = 0u64;
            while started.elapsed() < producing {
                let now = SystemClock.now_ms();
                let specs: Vec<TimerSpec> = (i..i + 20)
                    .map(|j| TimerSpec::new("q", format!("k{j}"), now + 500 + (j as i64 * 97) % 2_000))
                    .collect();
                let ids: Vec<(String, i64)> = specs.iter().map(|s| (s.key.clone(), s.due_at)).collect();
                match engine.schedule_batch(specs).await {
                    Ok(_) => acked.lock().extend(ids),
                    Err(_) => {
                        failed.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    }
                }
                i += 20;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };

    tokio::time::sleep(Duration::from_secs(3)).await;
    let fired_before = fired.lock().len();
    assert!(fired_before > 0, "nothing fired before the outage");
    stop();
    // Watch the engine's store health through the outage and the reconnect after it: a store
    // call fails only once its wait for a connection times out, so the moment it shows depends
    // on the store's timeouts and the machine's load.
    let mut during: Option<overdue_engine::EngineStats> = None;
    let watch = |during: &mut Option<overdue_engine::EngineStats>| {
        let s = engine.stats();
        if !s.store_healthy && during.is_none() {
            *during = Some(s);
        }
    };
    let outage_started = Instant::now();
    while outage_started.elapsed() < OUTAGE {
        watch(&mut during);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    start();
    let back = Instant::now();
    while during.is_none() && back.elapsed() < Duration::from_secs(3) {
        watch(&mut during);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    producer.await.expect("producer");

    // Everything acknowledged fires: wait for the last due time plus the backstop's reach.
    let acked: Vec<(String, i64)> = acked.lock().clone();
    let last_due = acked.iter().map(|(_, d)| *d).max().unwrap_or(0);
    let deadline = Instant::now() + Duration::from_secs(30);
    let want: HashSet<&str> = acked.iter().map(|(k, _)| k.as_str()).collect();
    loop {
        let missing = {
            let f = fired.lock();
            want.iter().filter(|k| !f.contains_key(**k)).count()
        };
        if missing == 0 && SystemClock.now_ms() > last_due {
            break;
        }
        assert!(Instant::now() < deadline, "{missing} acknowledged timers never fired after the restart");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let f = fired.lock().clone();
    let early: Vec<_> = f.iter().filter(|(_, (due, at))| at < due).collect();
    assert!(early.is_empty(), "timers fired early: {early:?}");
    let during = during.unwrap_or_else(|| panic!("{what}: the outage never showed in the stats: {:?}", engine.stats()));
    assert!(during.store_errors > 0 && during.store_error.is_some(), "{what}: {during:?}");
    let after = engine.stats();
    assert!(after.store_healthy, "the store is still reported unhealthy after it came back: {after:?}");
    eprintln!(
        "{what} restart: {} acknowledged timers, all fired; {} schedule calls refused during the outage; \
         {} store errors counted; {} rescued by the backstop; lateness p99 {} ms, max {} ms",
        acked.len(),
        failed.load(std::sync::atomic::Ordering::Relaxed),
        after.store_errors,
        after.backstop_rescued,
        after.lateness.p99_ms,
        after.lateness.max_ms
    );
    let engine = Arc::try_unwrap(engine).ok();
    if let Some(e) = engine {
        e.shutdown(Duration::from_secs(5)).await;
    }
}
