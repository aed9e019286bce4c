//! Engine behaviour beyond the shared contract: the memory cap of the in-memory index, and the
//! backstop sweep that fires what no trigger woke up for. Virtual time, reference store.

use std::sync::Arc;
use std::time::Duration;

use overdue_core::{ManualClock, Outcome, Store, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig, TriggerKind};
use overdue_testkit::memory::MemoryStore;
use overdue_testkit::{Recorder, T0};

async fn engine(store: Arc<dyn Store>, clock: &ManualClock, config: EngineConfig, rec: &Recorder) -> Engine {
    Engine::builder(store)
        .clock(Arc::new(clock.clone()))
        .config(config)
        .handler("q", QueueConfig { concurrency: 1, ..QueueConfig::default() }, rec.handler(|_| Outcome::Done))
        .start()
        .await
        .expect("start")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_index_stays_near_its_cap_and_still_fires_everything_in_order() {
    for trigger in [TriggerKind::Wheel, TriggerKind::Heap] {
        let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
        // Written straight into the store, as another process would: the loader must page them.
        let specs: Vec<TimerSpec> = (0..30_000).map(|i| TimerSpec::new("q", format!("k{i:05}"), T0 + 1 + i)).collect();
        for chunk in specs.chunks(10_000) {
            store.schedule(chunk.to_vec(), T0).await.expect("schedule");
        }
        let clock = ManualClock::new(T0);
        let rec = Recorder::default();
        let config = EngineConfig { trigger, max_resident: 10_000, horizon: Duration::from_secs(3_600), ..EngineConfig::default() };
        let e = engine(store, &clock, config, &rec).await;
        e.settle().await;
        let resident = e.stats().resident;
        assert!(resident <= 20_000, "{trigger}: {resident} references in memory with a cap of 10,000 (one page of slack allowed)");
        assert!(rec.is_empty(), "{trigger}: fired before due");
        clock.set(T0 + 40_000);
        e.settle().await;
        let due: Vec<i64> = rec.firings().iter().map(|f| f.due_at).collect();
        assert_eq!(due.len(), 30_000, "{trigger}: not every timer fired");
        assert!(due.windows(2).all(|w| w[0] <= w[1]), "{trigger}: out of due order");
        assert_eq!(e.stats().backstop_rescued, 0, "{trigger}: the loader, not the backstop, should have fired them");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_backstop_fires_a_timer_no_trigger_knew_about_and_counts_it() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let rec = Recorder::default();
    let config = EngineConfig {
        backstop_interval: Duration::from_secs(5),
        backstop_slack: Duration::from_secs(2),
        ..EngineConfig::default()
    };
    let e = engine(store.clone(), &clock, config, &rec).await;
    e.settle().await; // the horizon now covers T0 .. T0+30 s
    // Another writer puts a timer inside the covered range, behind the engine's back: the wheel
    // never hears of it (the situation of a lost wake-up).
    store.schedule(vec![TimerSpec::new("q", "orphan", T0 + 1_000)], T0).await.expect("schedule");
    clock.set(T0 + 2_999);
    e.settle().await;
    assert!(rec.is_empty(), "nothing should know about the orphan yet");
    // The backstop runs every 5 s and takes what is more than 2 s overdue.
    clock.set(T0 + 5_000);
    e.settle().await;
    assert_eq!(rec.keys(), ["orphan"]);
    let stats = e.stats();
    assert_eq!(stats.backstop_rescued, 1, "{stats:?}");
    assert!(rec.firings()[0].fired_at - rec.firings()[0].due_at <= 5_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_written_in_the_callers_transaction_and_tracked_fires_on_time() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let rec = Recorder::default();
    let e = engine(store.clone(), &clock, EngineConfig::default(), &rec).await;
    e.settle().await;
    // As the order service does: its own transaction writes the timer, then tells the engine.
    let generation = store.schedule(vec![TimerSpec::new("q", "tracked", T0 + 1_000)], T0).await.expect("schedule")[0];
    e.track([overdue_core::TimerRef { queue: "q".into(), key: "tracked".into(), generation, due_at: T0 + 1_000 }]);
    clock.set(T0 + 1_000);
    e.settle().await;
    assert_eq!(rec.keys(), ["tracked"], "a tracked timer fires at its due time, without the backstop");
    assert_eq!(rec.firings()[0].fired_at, T0 + 1_000);
    assert_eq!(e.stats().backstop_rescued, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fallback_handler_runs_queues_without_their_own() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let own = Recorder::default();
    let fallback = Recorder::default();
    let e = Engine::builder(store)
        .clock(Arc::new(clock.clone()))
        .handler("q", QueueConfig::default(), own.handler(|_| Outcome::Done))
        .fallback_handler(QueueConfig::default(), fallback.handler(|_| Outcome::Done))
        .start()
        .await
        .expect("start");
    e.schedule(TimerSpec::new("q", "mine", T0)).await.expect("schedule");
    e.schedule(TimerSpec::new("billing.retry", "inv-7", T0)).await.expect("schedule");
    e.settle().await;
    assert_eq!(own.keys(), ["mine"]);
    let f = fallback.firings();
    assert_eq!(f.iter().map(|f| (f.queue.as_str(), f.key.as_str())).collect::<Vec<_>>(), [("billing.retry", "inv-7")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_waited_past_its_safe_start_is_released_and_claimed_afresh_not_run_late() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let started = Arc::new(parking_lot::Mutex::new(Vec::<(String, i64)>::new()));
    let slow_started = Arc::new(tokio::sync::Notify::new());
    let (g, st, c, ss) = (gate.clone(), started.clone(), clock.clone(), slow_started.clone());
    // One handler at a time, 30 s timeout, 60 s lease (the defaults): the second timer's claim
    // waits behind the first handler.
    let queue = QueueConfig { concurrency: 1, ..QueueConfig::default() };
    let e = Engine::builder(store)
        .clock(Arc::new(clock.clone()))
        .handler("q", queue, move |f: overdue_core::Firing| {
            let (g, st, c, ss) = (g.clone(), st.clone(), c.clone(), ss.clone());
            async move {
                st.lock().push((f.key.clone(), c.now()));
                if f.key == "slow" {
                    ss.notify_one();
                    let _ = g.acquire().await.map(|p| p.forget());
                }
                Outcome::Done
            }
        })
        .start()
        .await
        .expect("start");
    e.schedule(TimerSpec::new("q", "slow", T0)).await.expect("schedule");
    e.schedule(TimerSpec::new("q", "waiting", T0 + 1)).await.expect("schedule");
    clock.set(T0 + 1);
    // Both are claimed at T0+1 (lease until T0+60,001); "slow" runs and blocks.
    let settle = e.settle();
    tokio::pin!(settle);
    tokio::select! {
        _ = &mut settle => panic!("settle returned while a handler was blocked"),
        r = tokio::time::timeout(Duration::from_secs(30), slow_started.notified()) => {
            r.expect("the slow handler did not start");
        }
    }
    // "waiting" is claimed in the same pass as "slow", but that claim may still be on its way
    // when "slow" starts (claims are pipelined): wait until its lease is held at T0+1, or the
    // clock jump below would find it unclaimed and the test would prove nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = e.get("q", "waiting").await.expect("get").expect("waiting is stored");
        if matches!(t.state, overdue_core::TimerState::InFlight { .. }) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "\"waiting\" was never claimed at T0+1: {t:?}");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // 40 s later the slow handler finishes: "waiting" could now run until T0+70 s, past its lease.
    clock.set(T0 + 40_001);
    gate.add_permits(1);
    settle.await;
    e.settle().await;
    let runs = started.lock().clone();
    assert_eq!(runs.iter().filter(|(k, _)| k == "waiting").count(), 1, "{runs:?}");
    assert_eq!(e.stats().lease_releases, 1, "{:?}", e.stats());
    assert!(e.get("q", "waiting").await.expect("get").is_none(), "it ran, with a fresh claim, and completed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_queue_cannot_take_every_claim_and_starve_the_others() {
    let store: Arc<dyn Store> = Arc::new(MemoryStore::new());
    let clock = ManualClock::new(T0);
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let fast = Recorder::default();
    let fast_fired = Arc::new(tokio::sync::Notify::new());
    let ff = fast_fired.clone();
    let slow_runs = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let (g, runs) = (gate.clone(), slow_runs.clone());
    let config = EngineConfig { max_in_flight: 8, claim_batch: 8, ..EngineConfig::default() };
    let e = Engine::builder(store)
        .clock(Arc::new(clock.clone()))
        .config(config)
        // One handler at a time and stuck until the gate opens: at most 1 × 4 claims.
        .handler("slow", QueueConfig { concurrency: 1, timeout: Duration::from_secs(50), ..QueueConfig::default() }, move |_f: overdue_core::Firing| {
            let (g, runs) = (g.clone(), runs.clone());
            async move {
                runs.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = g.acquire().await.map(|p| p.forget());
                Outcome::Done
            }
        })
        .handler("fast", QueueConfig::default(), fast.handler(move |_| {
            ff.notify_one();
            Outcome::Done
        }))
        .start()
        .await
        .expect("start");
    let slow: Vec<TimerSpec> = (0..20).map(|i| TimerSpec::new("slow", format!("s{i:02}"), T0)).collect();
    e.schedule_batch(slow).await.expect("schedule");
    e.schedule(TimerSpec::new("fast", "f", T0 + 1)).await.expect("schedule");
    clock.set(T0 + 1);
    {
        let settle = e.settle();
        tokio::pin!(settle);
        // With 8 in-flight permits and 20 slow timers due first, the fast timer would wait for
        // the slow queue without the per-queue cap.
        tokio::select! {
            _ = &mut settle => panic!("settle returned while the slow queue was stuck"),
            r = tokio::time::timeout(Duration::from_secs(30), fast_fired.notified()) => {
                r.expect("the fast timer did not fire while the slow queue was stuck");
            }
        }
        let stats = e.stats();
        assert!(stats.deferred >= 16, "the slow queue's extra timers should wait unclaimed: {stats:?}");
        assert!(stats.in_flight <= 5, "at most 4 slow claims plus the fast one: {stats:?}");
        gate.add_permits(1_000);
        settle.await;
    }
    e.settle().await;
    assert_eq!(fast.keys(), ["f"]);
    assert_eq!(slow_runs.load(std::sync::atomic::Ordering::SeqCst), 20, "every slow timer ran once");
    assert_eq!(e.stats().deferred, 0);
    assert!(e.list(&overdue_core::ListQuery::default()).await.expect("list").is_empty());
}
