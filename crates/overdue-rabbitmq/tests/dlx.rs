//! The RabbitMQ TTL cascade (`amqp://…?mode=dlx`) over the SQLite store with its outbox on: the
//! whole conformance suite, the head-of-line case (10 s then 1 s fire at 10 s and 1 s), cancel
//! and reschedule by generation on the real clock, early arrivals published again, and notices
//! waiting in the durable due queue for an engine that was down. Each test has its own prefix,
//! whose exchanges and queues are deleted when it ends. Under `CI` an unreachable broker fails
//! these tests; elsewhere it skips them.
//!
//! The broker waits in real time, so these tests wait for it, always by polling a condition with
//! a deadline, never by a fixed sleep.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Amqp, until};
use overdue_core::{Clock, ExternalTrigger, Firing, ManualClock, Outcome, SystemClock, TimerRef, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_rabbitmq::{Mode, RESOLUTION_MS};
use overdue_testkit::T0;

mod conformance {
    overdue_testkit::conformance_tests!(match super::Amqp::fresh(overdue_rabbitmq::Mode::Dlx).await {
        Some(backend) => backend,
        None => return,
    });
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec { queue: "q".into(), key: key.into(), due_at, payload: Vec::new() }
}

type Fired = Arc<Mutex<Vec<Firing>>>;

/// An engine on `clock` over the backend's store and a new trigger, recording queue `q`.
async fn engine(backend: &Amqp, clock: Arc<dyn Clock>) -> (Engine, overdue_rabbitmq::AmqpTrigger, Fired) {
    let trigger = backend.fresh.trigger();
    let fired: Fired = Arc::default();
    let rec = fired.clone();
    let engine = Engine::builder(Arc::new(backend.store().await))
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

/// Lateness bound of these tests: the cascade's resolution plus the broker's and engine's own
/// latency on a shared, busy 2-core machine (typically 30-150 ms in all; the slack is for load
/// spikes). Head-of-line blocking would show as 9 s, far outside it.
const LATE_MS: i64 = RESOLUTION_MS + 900;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_timer_behind_a_long_one_fires_on_time() {
    let Some(backend) = Amqp::fresh(Mode::Dlx).await else { return };
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("the consumer is consuming", Duration::from_secs(10), || trigger.consuming()).await;
    assert!(engine.stats().trigger_healthy, "{:?}", engine.stats());
    let t0 = SystemClock.now_ms();
    // In this order: one queue with per-message TTLs would deliver "one" at 10 s, behind "ten".
    engine.schedule(spec("ten", t0 + 10_000)).await.expect("schedule");
    engine.schedule(spec("one", t0 + 1_000)).await.expect("schedule");
    until("the 1 s timer fired", Duration::from_secs(5), || !fired_at(&fired, "one").is_empty()).await;
    let one = fired_at(&fired, "one")[0].1 - t0;
    assert!((1_000..1_000 + LATE_MS).contains(&one), "the 1 s timer fired after {one} ms");
    assert!(fired_at(&fired, "ten").is_empty(), "the 10 s timer fired early");
    until("the 10 s timer fired", Duration::from_secs(13), || !fired_at(&fired, "ten").is_empty()).await;
    let ten = fired_at(&fired, "ten")[0].1 - t0;
    assert!((10_000..10_000 + LATE_MS).contains(&ten), "the 10 s timer fired after {ten} ms");
    until("both settled", Duration::from_secs(5), || engine.stats().completed == 2).await;
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.backstop_rescued), (2, 0), "both came through the broker: {stats:?}");
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_reschedule_work_by_generation_on_the_real_clock() {
    let Some(backend) = Amqp::fresh(Mode::Dlx).await else { return };
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("the consumer is consuming", Duration::from_secs(10), || trigger.consuming()).await;
    let t0 = SystemClock.now_ms();
    engine.schedule(spec("cancelled", t0 + 1_000)).await.expect("schedule");
    assert!(engine.cancel("q", "cancelled").await.expect("cancel"));
    let g_later = engine.schedule(spec("sooner", t0 + 2_500)).await.expect("schedule");
    let g_sooner = engine.reschedule("q", "sooner", t0 + 1_000).await.expect("reschedule");
    let g_first = engine.schedule(spec("later", t0 + 1_000)).await.expect("schedule");
    let g_second = engine.schedule(spec("later", t0 + 2_000)).await.expect("upsert later");
    assert!(g_sooner > g_later && g_second > g_first);
    until("both live timers fired", Duration::from_secs(6), || engine.stats().completed >= 2).await;
    // Every stale notice (cancelled@1 s, later@1 s, sooner@2.5 s) arrives and is dropped.
    until("the three stale notices were dropped", Duration::from_secs(6), || engine.stats().stale_dropped >= 3).await;
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
async fn an_early_arrival_is_published_again_for_the_rest_of_its_delay() {
    let Some(backend) = Amqp::fresh(Mode::Dlx).await else { return };
    let clock = ManualClock::new(T0);
    let (engine, trigger, fired) = engine(&backend, Arc::new(clock.clone())).await;
    until("the consumer is consuming", Duration::from_secs(10), || trigger.consuming()).await;
    let generation = engine.schedule(spec("e", T0 + 3_000)).await.expect("schedule");
    // A copy of its notice published as if 2.9 s of its delay had passed: it comes back after
    // about 0.1 s, 2.9 s early on the engine's clock, and must go round again.
    let notice = TimerRef { queue: "q".into(), key: "e".into(), generation, due_at: T0 + 3_000 };
    trigger.publish(std::slice::from_ref(&notice), T0 + 2_900).await.expect("publish");
    until("the copy came back early and was published again", Duration::from_secs(5), || trigger.stats().early >= 1).await;
    assert!(fired.lock().expect("lock").is_empty(), "fired before its due time");
    clock.set(T0 + 3_000);
    until("the timer fired through the broker", Duration::from_secs(8), || engine.stats().completed == 1).await;
    // Both remaining copies (the outbox's and the re-published one) arrive; the second is stale.
    until("the second copy was dropped", Duration::from_secs(8), || engine.stats().stale_dropped >= 1).await;
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.backstop_rescued), (1, 0), "{stats:?} {:?}", trigger.stats());
    assert_eq!(fired.lock().expect("lock").len(), 1);
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_wait_in_the_durable_due_queue_while_no_engine_runs() {
    let Some(backend) = Amqp::fresh(Mode::Dlx).await else { return };
    const N: usize = 200;
    // Generous: publishing and stopping must finish before the due time, also on a busy machine.
    const DUE_IN: i64 = 4_000;
    let t0;
    {
        let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
        t0 = SystemClock.now_ms();
        let specs: Vec<TimerSpec> = (0..N).map(|i| spec(&format!("k{i}"), t0 + DUE_IN)).collect();
        engine.schedule_batch(specs).await.expect("schedule");
        until("the outbox was relayed", Duration::from_secs(5), || engine.stats().published >= N as u64).await;
        engine.shutdown(Duration::from_secs(5)).await;
        let down = SystemClock.now_ms() - t0;
        assert!(down < DUE_IN, "inconclusive: the first engine took {down} ms to publish and stop");
        assert!(fired.lock().expect("lock").is_empty(), "fired before its due time");
        // One relay round of timers due together takes one or two routes (the delay left is
        // rounded up to 128 ms): they travel packed, up to 128 notices per message.
        let s = trigger.stats();
        assert_eq!(s.published, N as u64, "{s:?}");
        assert!(s.published_messages <= 4, "{N} notices of at most two routes in at most 4 messages: {s:?}");
    }
    // Nobody consumes while the notices come due: they wait in P.due.
    let wait = (t0 + DUE_IN + 500 - SystemClock.now_ms()).max(0) as u64;
    tokio::time::sleep(Duration::from_millis(wait)).await;
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("every timer fired", Duration::from_secs(10), || engine.stats().completed >= N as u64).await;
    let s = trigger.stats();
    assert_eq!((s.received, s.received_messages <= 4), (N as u64, true), "received as packed: {s:?}");
    let stats = engine.stats();
    assert_eq!(stats.backstop_rescued, 0, "they came from the broker, not the backstop: {stats:?}");
    let mut keys: Vec<String> = fired.lock().expect("lock").iter().map(|f| f.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), N, "each fired once");
    assert_eq!(fired.lock().expect("lock").len(), N, "no double firing");
    engine.shutdown(Duration::from_secs(5)).await;
}
