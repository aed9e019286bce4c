//! The Kafka level topics (`kafka://…`) over the SQLite store with its outbox on: the whole
//! conformance suite, a short timer behind a long one, cancel and reschedule by generation on
//! the real clock, virtual time (a notice never fires before its due time on a manual clock, and
//! does as soon as the clock gets there), two nodes in one group sharing the partitions, and
//! notices that wait in the topics while no engine runs. Each test has its own prefix, whose
//! topics are deleted when it ends. Under `CI` an unreachable broker fails these tests;
//! elsewhere it skips them.
//!
//! The broker waits in real time, so these tests wait for it, always by polling a condition with
//! a deadline, never by a fixed sleep.

mod common;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Kafka, until};
use overdue_core::{Clock, ExternalTrigger, Firing, ManualClock, Outcome, Store, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_kafka::{HOLD_MS, KafkaTrigger, MIN_SHIFT, level_for};
use overdue_testkit::T0;

mod conformance {
    overdue_testkit::conformance_tests!(match super::Kafka::fresh().await {
        Some(backend) => backend,
        None => return,
    });
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec { queue: "q".into(), key: key.into(), due_at, payload: Vec::new() }
}

type Fired = Arc<Mutex<Vec<Firing>>>;

/// An engine on `clock` over the backend's store and a new trigger, recording queue `q`.
async fn engine(backend: &Kafka, clock: Arc<dyn Clock>) -> (Engine, KafkaTrigger, Fired) {
    engine_on(backend, Arc::new(backend.store().await), clock).await
}

/// The same over a store already open (two engines in one process share one SQLite store).
async fn engine_on(backend: &Kafka, store: Arc<dyn Store>, clock: Arc<dyn Clock>) -> (Engine, KafkaTrigger, Fired) {
    let trigger = backend.fresh.trigger();
    let fired: Fired = Arc::default();
    let rec = fired.clone();
    let engine = Engine::builder(store)
        .clock(clock)
        .config(EngineConfig::default())
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig { jitter: 0.0, ..QueueConfig::default() }, move |f: Firing| {
            rec.lock().expect("lock").push(f);
            async { Outcome::Done }
        })
        .start()
        .await
        .expect("start the engine");
    (engine, trigger, fired)
}

fn fired_at(fired: &Fired, key: &str) -> Vec<(u64, i64)> {
    fired.lock().expect("lock").iter().filter(|f| f.key == key).map(|f| (f.generation, f.fired_at)).collect()
}

/// Lateness bound of these tests: the last second is waited in memory, so what is left is the
/// broker's and the engine's own latency on a shared, busy 2-core machine (typically tens of ms;
/// the slack is for load spikes). Head-of-line blocking would show as seconds.
const LATE_MS: i64 = 900;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_timer_behind_a_long_one_fires_on_time() {
    let Some(backend) = Kafka::fresh().await else { return };
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("the consumer has partitions", Duration::from_secs(20), || trigger.consuming()).await;
    let t0 = SystemClock.now_ms();
    engine.schedule(spec("ten", t0 + 10_000)).await.expect("schedule");
    engine.schedule(spec("one", t0 + 1_500)).await.expect("schedule");
    until("the 1.5 s timer fired", Duration::from_secs(6), || !fired_at(&fired, "one").is_empty()).await;
    let one = fired_at(&fired, "one")[0].1 - t0;
    assert!((1_500..1_500 + LATE_MS).contains(&one), "the 1.5 s timer fired after {one} ms");
    assert!(fired_at(&fired, "ten").is_empty(), "the 10 s timer fired early");
    until("the 10 s timer fired", Duration::from_secs(13), || !fired_at(&fired, "ten").is_empty()).await;
    let ten = fired_at(&fired, "ten")[0].1 - t0;
    assert!((10_000..10_000 + LATE_MS).contains(&ten), "the 10 s timer fired after {ten} ms");
    until("both settled", Duration::from_secs(5), || engine.stats().completed == 2).await;
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.backstop_rescued), (2, 0), "both came through the broker: {stats:?}");
    // 10 s = 8192 + 1808 ms: level 13, then level 10, then memory; 1.5 s: level 10 only.
    assert!(trigger.stats().hops >= 1, "{:?}", trigger.stats());
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_reschedule_work_by_generation_on_the_real_clock() {
    let Some(backend) = Kafka::fresh().await else { return };
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("the consumer has partitions", Duration::from_secs(20), || trigger.consuming()).await;
    let t0 = SystemClock.now_ms();
    engine.schedule(spec("cancelled", t0 + 1_000)).await.expect("schedule");
    assert!(engine.cancel("q", "cancelled").await.expect("cancel"));
    let g_later = engine.schedule(spec("sooner", t0 + 2_500)).await.expect("schedule");
    let g_sooner = engine.reschedule("q", "sooner", t0 + 1_000).await.expect("reschedule");
    let g_first = engine.schedule(spec("later", t0 + 1_000)).await.expect("schedule");
    let g_second = engine.schedule(spec("later", t0 + 2_000)).await.expect("upsert later");
    assert!(g_sooner > g_later && g_second > g_first);
    until("both live timers fired", Duration::from_secs(8), || engine.stats().completed >= 2).await;
    // Every stale notice (cancelled@1 s, later@1 s, sooner@2.5 s) arrives and is dropped.
    until("the three stale notices were dropped", Duration::from_secs(8), || engine.stats().stale_dropped >= 3).await;
    let sooner = fired_at(&fired, "sooner");
    let later = fired_at(&fired, "later");
    assert_eq!(sooner.len(), 1, "{sooner:?}");
    assert_eq!(later.len(), 1, "{later:?}");
    assert_eq!(sooner[0].0, g_sooner, "the rescheduled generation fired");
    assert_eq!(later[0].0, g_second, "the upserted generation fired");
    assert!((1_000..1_000 + LATE_MS).contains(&(sooner[0].1 - t0)), "sooner fired at {} ms", sooner[0].1 - t0);
    assert!((2_000..2_000 + LATE_MS).contains(&(later[0].1 - t0)), "later fired at {} ms", later[0].1 - t0);
    assert!(fired_at(&fired, "cancelled").is_empty(), "the cancelled timer fired");
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.stale_dropped, stats.backstop_rescued), (2, 3, 0), "{stats:?}");
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_manual_clock_a_long_delay_walks_down_the_levels_and_fires_at_its_due_time() {
    let Some(backend) = Kafka::fresh().await else { return };
    let clock = ManualClock::new(T0);
    let (engine, trigger, fired) = engine(&backend, Arc::new(clock.clone())).await;
    until("the consumer has partitions", Duration::from_secs(20), || trigger.consuming()).await;
    // Three days and a bit. The levels wait on the engine's clock: set it to each release time
    // exactly, and the notice takes one level per 1 bit of the delay (in seconds of 1024 ms),
    // largest first, then waits the last part in memory.
    let delay = 3 * 86_400_000 + 12_345;
    let due = T0 + delay;
    engine.schedule(spec("far", due)).await.expect("schedule");
    until("the notice was published", Duration::from_secs(10), || engine.stats().published == 1).await;
    let (mut at, mut left, mut levels) = (T0, delay, 0u64);
    while let Some(s) = level_for(left) {
        at += 1 << s;
        left -= 1 << s;
        levels += 1;
        clock.set(at);
        if level_for(left).is_some() {
            until("the notice went on to the next level", Duration::from_secs(10), || trigger.stats().hops == levels).await;
        }
        assert!(fired_at(&fired, "far").is_empty(), "fired at {at}, before its due time {due}");
    }
    assert_eq!(levels, u64::from((delay >> MIN_SHIFT).count_ones()), "one level per 1 bit");
    until("the notice waits in memory", Duration::from_secs(10), || trigger.stats().held == 1).await;
    assert!(due - at < HOLD_MS);
    assert!(fired_at(&fired, "far").is_empty(), "fired before its due time");
    clock.set(due);
    until("the timer fired at its due time", Duration::from_secs(10), || !fired_at(&fired, "far").is_empty()).await;
    // Fired once, and at `due` on the engine's clock: had any step released it early, it would
    // carry that step's time.
    assert_eq!(fired_at(&fired, "far"), vec![(1, due)]);
    assert_eq!(engine.stats().backstop_rescued, 0, "{:?}", engine.stats());
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_in_one_group_share_the_work_and_fire_each_timer_once() {
    let Some(backend) = Kafka::fresh().await else { return };
    // Two nodes: two engines and two consumers in one group, over one store (in one process they
    // share the SQLite store; across processes it would be PostgreSQL or MySQL).
    let store: Arc<dyn Store> = Arc::new(backend.store().await);
    let (a, ta, fired_a) = engine_on(&backend, store.clone(), Arc::new(SystemClock)).await;
    let (b, tb, fired_b) = engine_on(&backend, store, Arc::new(SystemClock)).await;
    until("both consumers have partitions", Duration::from_secs(30), || ta.consuming() && tb.consuming()).await;
    const N: usize = 400;
    let t0 = SystemClock.now_ms();
    let specs: Vec<TimerSpec> = (0..N).map(|i| spec(&format!("k{i}"), t0 + 1_500 + (i as i64 % 40) * 25)).collect();
    a.schedule_batch(specs).await.expect("schedule");
    until("every timer fired", Duration::from_secs(20), || a.stats().completed + b.stats().completed >= N as u64).await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for f in fired_a.lock().expect("lock").iter().chain(fired_b.lock().expect("lock").iter()) {
        *per_key.entry(f.key.clone()).or_default() += 1;
    }
    assert_eq!(per_key.len(), N, "nothing lost");
    assert!(per_key.values().all(|&n| n == 1), "nothing fired twice");
    let (na, nb) = (fired_a.lock().expect("lock").len(), fired_b.lock().expect("lock").len());
    assert!(na > 0 && nb > 0, "both nodes fired some: {na} and {nb}");
    assert_eq!(a.stats().backstop_rescued + b.stats().backstop_rescued, 0);
    a.shutdown(Duration::from_secs(5)).await;
    b.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_wait_in_the_topics_while_no_engine_runs() {
    let Some(backend) = Kafka::fresh().await else { return };
    const N: usize = 200;
    const DUE_IN: i64 = 5_000;
    let t0;
    {
        let (engine, _trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
        t0 = SystemClock.now_ms();
        let specs: Vec<TimerSpec> = (0..N).map(|i| spec(&format!("k{i}"), t0 + DUE_IN)).collect();
        engine.schedule_batch(specs).await.expect("schedule");
        until("the outbox was relayed", Duration::from_secs(5), || engine.stats().published >= N as u64).await;
        engine.shutdown(Duration::from_secs(5)).await;
        let down = SystemClock.now_ms() - t0;
        assert!(down < DUE_IN, "inconclusive: the first engine took {down} ms to publish and stop");
        assert!(fired.lock().expect("lock").is_empty(), "fired before its due time");
    }
    // Nobody consumes while the notices come due.
    let wait = (t0 + DUE_IN + 500 - SystemClock.now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (engine, _trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("every timer fired", Duration::from_secs(30), || engine.stats().completed >= N as u64).await;
    let stats = engine.stats();
    assert_eq!(stats.backstop_rescued, 0, "they came from the broker, not the backstop: {stats:?}");
    let mut keys: Vec<String> = fired.lock().expect("lock").iter().map(|f| f.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), N, "each fired once");
    assert_eq!(fired.lock().expect("lock").len(), N, "no double firing");
    engine.shutdown(Duration::from_secs(5)).await;
}
