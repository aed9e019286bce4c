//! RocketMQ timer messages (`rocketmq://…?mode=timer`) over the SQLite store with its outbox on:
//! the whole conformance suite, a short timer behind a long one, cancel and reschedule by
//! generation on the real clock, delays longer than the maximum travelling in hops, and notices
//! waiting in the broker while no engine runs. Each test has its own prefix. Under `CI` an
//! unreachable broker fails these tests; elsewhere it skips them.
//!
//! The broker waits in real time, so these tests wait for it, always by polling a condition with
//! a deadline, never by a fixed sleep.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Rocket, until};
use overdue_core::{Clock, Delivery, DueSink, ExternalTrigger, Firing, ManualClock, Outcome, SystemClock, TimerRef, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_rocketmq::{Mode, RocketTrigger};
use overdue_testkit::T0;

mod conformance {
    overdue_testkit::conformance_tests!(match super::Rocket::fresh(overdue_rocketmq::Mode::Timer).await {
        Some(backend) => backend,
        None => return,
    });
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec { queue: "q".into(), key: key.into(), due_at, payload: Vec::new() }
}

type Fired = Arc<Mutex<Vec<Firing>>>;

/// An engine on `clock` over the backend's store and `trigger`, recording queue `q`.
async fn engine_with(backend: &Rocket, clock: Arc<dyn Clock>, trigger: RocketTrigger) -> (Engine, RocketTrigger, Fired) {
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

async fn engine(backend: &Rocket, clock: Arc<dyn Clock>) -> (Engine, RocketTrigger, Fired) {
    let trigger = backend.fresh.trigger();
    engine_with(backend, clock, trigger).await
}

fn fired_at(fired: &Fired, key: &str) -> Vec<(u64, i64)> {
    fired.lock().expect("lock").iter().filter(|f| f.key == key).map(|f| (f.generation, f.fired_at)).collect()
}

/// Lateness bound of these tests: the broker's timer precision (100 ms in scripts/brokers.sh)
/// plus the broker's, the consumer's and the engine's latency on a shared, busy 2-core machine.
/// Head-of-line blocking would show as 9 s, far outside it.
const LATE_MS: i64 = 1_500;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_timer_behind_a_long_one_fires_on_time() {
    let Some(backend) = Rocket::fresh(Mode::Timer).await else { return };
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("the consumer is consuming", Duration::from_secs(20), || trigger.consuming()).await;
    assert!(engine.stats().trigger_healthy, "{:?}", engine.stats());
    let t0 = SystemClock.now_ms();
    engine.schedule(spec("ten", t0 + 10_000)).await.expect("schedule");
    engine.schedule(spec("one", t0 + 1_000)).await.expect("schedule");
    until("the 1 s timer fired", Duration::from_secs(8), || !fired_at(&fired, "one").is_empty()).await;
    let one = fired_at(&fired, "one")[0].1 - t0;
    assert!((1_000..1_000 + LATE_MS).contains(&one), "the 1 s timer fired after {one} ms");
    assert!(fired_at(&fired, "ten").is_empty(), "the 10 s timer fired early");
    until("the 10 s timer fired", Duration::from_secs(15), || !fired_at(&fired, "ten").is_empty()).await;
    let ten = fired_at(&fired, "ten")[0].1 - t0;
    assert!((10_000..10_000 + LATE_MS).contains(&ten), "the 10 s timer fired after {ten} ms");
    until("both settled", Duration::from_secs(5), || engine.stats().completed == 2).await;
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.backstop_rescued), (2, 0), "both came through the broker: {stats:?}");
    assert!(trigger.stats().delayed >= 2, "{:?}", trigger.stats());
    eprintln!("lateness: 1 s timer {} ms, 10 s timer {} ms", one - 1_000, ten - 10_000);
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_and_reschedule_work_by_generation_on_the_real_clock() {
    let Some(backend) = Rocket::fresh(Mode::Timer).await else { return };
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("the consumer is consuming", Duration::from_secs(20), || trigger.consuming()).await;
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
async fn a_delay_past_the_maximum_travels_in_hops_and_fires_on_time() {
    let Some(mut backend) = Rocket::fresh(Mode::Timer).await else { return };
    // A maximum of 1 s: a 6 s timer is published for 1 s, comes back 5 s early, goes round
    // again (a hop) until it is at most 2 s early, and the engine holds it until due.
    backend.fresh.max_delay_ms = 1_000;
    let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
    until("the consumer is consuming", Duration::from_secs(20), || trigger.consuming()).await;
    let t0 = SystemClock.now_ms();
    engine.schedule(spec("far", t0 + 6_000)).await.expect("schedule");
    until("the 6 s timer fired", Duration::from_secs(15), || !fired_at(&fired, "far").is_empty()).await;
    let at = fired_at(&fired, "far")[0].1 - t0;
    assert!((6_000..6_000 + LATE_MS).contains(&at), "the 6 s timer fired after {at} ms");
    let stats = trigger.stats();
    assert!(stats.early >= 3, "expected at least 3 hops: {stats:?}");
    let e = engine.stats();
    assert_eq!((e.completed, e.backstop_rescued), (1, 0), "{e:?}");
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_early_arrival_is_published_again_for_the_rest_of_its_delay() {
    let Some(backend) = Rocket::fresh(Mode::Timer).await else { return };
    let clock = ManualClock::new(T0);
    let (engine, trigger, fired) = engine(&backend, Arc::new(clock.clone())).await;
    until("the consumer is consuming", Duration::from_secs(20), || trigger.consuming()).await;
    let generation = engine.schedule(spec("e", T0 + 3_000)).await.expect("schedule");
    // A copy of its notice published as if 2.9 s of its delay had passed: it comes back after
    // about 0.1 s, 2.9 s early on the engine's clock, and must go round again.
    let notice = TimerRef { queue: "q".into(), key: "e".into(), generation, due_at: T0 + 3_000 };
    trigger.publish(std::slice::from_ref(&notice), T0 + 2_900).await.expect("publish");
    until("the copy came back early and was published again", Duration::from_secs(8), || trigger.stats().early >= 1).await;
    assert!(fired.lock().expect("lock").is_empty(), "fired before its due time");
    clock.set(T0 + 3_000);
    until("the timer fired through the broker", Duration::from_secs(10), || engine.stats().completed == 1).await;
    // Both remaining copies (the outbox's and the re-published one) arrive; the second is stale.
    until("the second copy was dropped", Duration::from_secs(10), || engine.stats().stale_dropped >= 1).await;
    let stats = engine.stats();
    assert_eq!((stats.completed, stats.backstop_rescued), (1, 0), "{stats:?} {:?}", trigger.stats());
    assert_eq!(fired.lock().expect("lock").len(), 1);
    engine.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn notices_wait_in_the_broker_while_no_engine_runs() {
    let Some(backend) = Rocket::fresh(Mode::Timer).await else { return };
    const N: usize = 200;
    // Generous: publishing and stopping must finish before the due time, also on a busy machine.
    const DUE_IN: i64 = 6_000;
    let t0;
    {
        let (engine, trigger, fired) = engine(&backend, Arc::new(SystemClock)).await;
        until("the consumer is consuming", Duration::from_secs(20), || trigger.consuming()).await;
        t0 = SystemClock.now_ms();
        let specs: Vec<TimerSpec> = (0..N).map(|i| spec(&format!("k{i}"), t0 + DUE_IN)).collect();
        engine.schedule_batch(specs).await.expect("schedule");
        until("the outbox was relayed", Duration::from_secs(5), || engine.stats().published >= N as u64).await;
        engine.shutdown(Duration::from_secs(5)).await;
        let down = SystemClock.now_ms() - t0;
        assert!(down < DUE_IN, "inconclusive: the first engine took {down} ms to publish and stop");
        assert!(fired.lock().expect("lock").is_empty(), "fired before its due time");
    }
    // Nobody consumes while the notices come due: they wait in the due topic.
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

/// A sink that acknowledges every notice and records it: a node without an engine, to look at
/// how the broker spreads one group's queues.
#[derive(Default)]
struct Recording {
    seen: Mutex<Vec<TimerRef>>,
    stopped: std::sync::atomic::AtomicBool,
    stop: tokio::sync::Notify,
}

impl Recording {
    fn stop(&self) {
        self.stopped.store(true, std::sync::atomic::Ordering::SeqCst);
        self.stop.notify_waiters();
    }
    fn keys(&self) -> Vec<String> {
        self.seen.lock().expect("lock").iter().map(|t| t.key.clone()).collect()
    }
}

#[async_trait::async_trait]
impl DueSink for Recording {
    async fn deliver(&self, notices: Vec<TimerRef>) -> Vec<Delivery> {
        let n = notices.len();
        self.seen.lock().expect("lock").extend(notices);
        vec![Delivery::Ack; n]
    }
    fn now_ms(&self) -> i64 {
        SystemClock.now_ms()
    }
    fn stopped(&self) -> bool {
        self.stopped.load(std::sync::atomic::Ordering::SeqCst)
    }
    async fn until_stopped(&self) {
        let notified = self.stop.notified();
        if !self.stopped() {
            notified.await;
        }
    }
    fn set_healthy(&self, _healthy: bool, _error: Option<String>) {}
}

fn notices(prefix: &str, n: usize, due_at: i64) -> Vec<TimerRef> {
    (0..n).map(|i| TimerRef { queue: "q".into(), key: format!("{prefix}{i}"), generation: 1, due_at }).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_share_the_group_and_a_stopped_node_hands_its_queues_over() {
    let Some(backend) = Rocket::fresh(Mode::Timer).await else { return };
    const N: usize = 400;
    let (ta, tb) = (backend.fresh.trigger(), backend.fresh.trigger());
    let (sa, sb) = (Arc::new(Recording::default()), Arc::new(Recording::default()));
    let ca = tokio::spawn({
        let (t, s) = (ta.clone(), sa.clone());
        async move { t.consume(s).await }
    });
    let cb = tokio::spawn({
        let (t, s) = (tb.clone(), sb.clone());
        async move { t.consume(s).await }
    });
    until("both consumers are consuming", Duration::from_secs(20), || ta.consuming() && tb.consuming()).await;
    // Let the group settle until both consumers hold queues: one probe per message (a publish
    // packs what takes the same hop into one message, which lands on one queue), the producer
    // going round the queues, until each node has received one.
    let settle = tokio::time::Instant::now();
    for i in 0.. {
        assert!(settle.elapsed() < Duration::from_secs(30), "the group did not settle: a {:?} b {:?}", ta.stats(), tb.stats());
        let probed = |s: &Recording| s.keys().iter().any(|k| k.starts_with("probe-"));
        if probed(&sa) && probed(&sb) {
            break;
        }
        ta.publish(&notices(&format!("probe-{i}-"), 1, 0), SystemClock.now_ms()).await.expect("publish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Due times 100 ms apart, so the notices travel in 10 messages: 10 queues in turn, more
    // than the 8 of the topic, so both nodes' queues get some.
    let now = SystemClock.now_ms();
    let spread: Vec<TimerRef> =
        notices("k", N, 0).into_iter().enumerate().map(|(i, t)| TimerRef { due_at: now + 1_000 + (i as i64 % 10) * 100, ..t }).collect();
    ta.publish(&spread, now).await.expect("publish");
    let count = |p: &str, s: &Recording| s.keys().iter().filter(|k| k.starts_with(p)).count();
    until("every notice arrived", Duration::from_secs(20), || count("k", &sa) + count("k", &sb) >= N).await;
    let mut all: Vec<String> = sa.keys().into_iter().chain(sb.keys()).filter(|k| k.starts_with('k')).collect();
    let total = all.len();
    all.sort();
    all.dedup();
    assert_eq!(all.len(), N, "every notice arrived");
    eprintln!("node a got {}, node b got {} (of {N}, {total} deliveries)", count("k", &sa), count("k", &sb));
    assert!(count("k", &sa) > 0 && count("k", &sb) > 0, "both nodes received notices: a {:?} b {:?}", ta.stats(), tb.stats());
    // Node a stops: its queues go to node b, which then receives everything.
    let stopping = tokio::time::Instant::now();
    sa.stop();
    ca.await.expect("join").expect("consume a");
    let stop_took = stopping.elapsed();
    eprintln!("node a's consume returned {stop_took:?} after the stop");
    assert!(stop_took < Duration::from_secs(10), "stopping took {stop_took:?}");
    let now = SystemClock.now_ms();
    tb.publish(&notices("after-", N, now + 500), now).await.expect("publish");
    until("node b received every later notice", Duration::from_secs(40), || count("after-", &sb) >= N).await;
    assert_eq!(count("after-", &sa), 0, "node a is stopped");
    sb.stop();
    cb.await.expect("join").expect("consume b");
    eprintln!("a {:?}\nb {:?}", ta.stats(), tb.stats());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_with_a_clear_error_without_a_name_server() {
    // Port 1 on loopback: nothing listens there.
    let trigger = RocketTrigger::from_url("rocketmq://127.0.0.1:1?prefix=nobody").expect("url");
    let started = tokio::time::Instant::now();
    let err = trigger.start().await.expect_err("started without a name server");
    let msg = err.to_string();
    assert!(msg.contains("127.0.0.1:1"), "{msg}");
    assert!(started.elapsed() < Duration::from_secs(30), "took {:?}", started.elapsed());
    eprintln!("{msg} (after {:?})", started.elapsed());
}
