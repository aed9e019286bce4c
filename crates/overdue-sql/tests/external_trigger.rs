//! The engine's external-trigger path over the SQLite store with its outbox on, driven by the
//! in-process loopback broker: notices go out through the outbox relay, come back through
//! `deliver`, are fenced by generation, acknowledged only after the settlement commits, and what
//! the broker loses is rescued by the backstop and counted.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use overdue_core::{ExternalTrigger, Firing, ManualClock, Outcome, Store, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_sql::{SqliteOptions, SqliteStore};
use overdue_testkit::T0;
use overdue_testkit::loopback::LoopbackTrigger;

async fn store(dir: &tempfile::TempDir) -> Arc<dyn Store> {
    let opts = SqliteOptions { outbox: true, ..SqliteOptions::default() };
    Arc::new(SqliteStore::open(dir.path().join("o.db"), opts).await.expect("open"))
}

/// Polls `cond` every 5 ms until it holds or 10 s pass (the broker works in real time).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec { queue: "q".into(), key: key.into(), due_at, payload: key.as_bytes().to_vec() }
}

struct Setup {
    engine: Engine,
    clock: ManualClock,
    broker: LoopbackTrigger,
    fired: Arc<parking_lot::Mutex<Vec<Firing>>>,
    _dir: tempfile::TempDir,
}

async fn start(config: EngineConfig, gate: Option<Arc<AtomicBool>>) -> Setup {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let broker = LoopbackTrigger::new();
    let fired = Arc::new(parking_lot::Mutex::new(Vec::new()));
    let rec = fired.clone();
    let engine = Engine::builder(store(&dir).await)
        .clock(Arc::new(clock.clone()))
        .config(config)
        .external_trigger(Arc::new(broker.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |f: Firing| {
            let rec = rec.clone();
            let gate = gate.clone();
            async move {
                if let Some(g) = gate {
                    while !g.load(Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_millis(2)).await;
                    }
                }
                rec.lock().push(f);
                Outcome::Done
            }
        })
        .start()
        .await
        .expect("start");
    Setup { engine, clock, broker, fired, _dir: dir }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_timers_come_back_through_the_broker_not_the_backstop() {
    let s = start(EngineConfig::default(), None).await;
    let specs: Vec<_> = (0..300).map(|i| spec(&format!("k{i}"), T0)).collect();
    s.engine.schedule_batch(specs).await.expect("schedule");
    until("300 completions", || s.engine.stats().completed == 300).await;
    let st = s.engine.stats();
    assert_eq!(st.backstop_rescued, 0, "the broker delivered everything");
    assert_eq!(st.published, 300);
    assert_eq!(st.trigger, "loopback");
    assert_eq!(s.fired.lock().len(), 300, "each fired once");
    until("300 acks", || s.broker.acked() == 300).await;
    assert!(s.engine.store().outbox_fetch(10).await.expect("outbox").is_empty(), "outbox drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_is_acknowledged_only_after_its_effect_commits() {
    let gate = Arc::new(AtomicBool::new(false));
    let s = start(EngineConfig::default(), Some(gate.clone())).await;
    s.engine.schedule(spec("slow", T0)).await.expect("schedule");
    until("delivery in progress", || s.engine.stats().in_flight == 1).await;
    // The handler is blocked: nothing may be acknowledged yet.
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert_eq!(s.broker.acked(), 0, "acked before the handler finished");
    gate.store(true, Ordering::SeqCst);
    until("ack after settle", || s.broker.acked() == 1).await;
    assert!(s.engine.get("q", "slow").await.expect("get").is_none(), "settled as done");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_or_replaced_timer_is_fenced_by_its_generation() {
    let s = start(EngineConfig::default(), None).await;
    // Due one second from now (virtual), so the notices sit in the broker while we change them.
    s.engine.schedule(spec("cancelled", T0 + 1000)).await.expect("schedule");
    s.engine.schedule(spec("moved", T0 + 1000)).await.expect("schedule");
    until("both published", || s.broker.published() == 2).await;
    assert!(s.engine.cancel("q", "cancelled").await.expect("cancel"));
    s.engine.reschedule("q", "moved", T0 + 5000).await.expect("reschedule");
    s.clock.set(T0 + 1000);
    // The first two notices come back after ~1 s real: one cancelled, one stale.
    until("stale notices acked", || s.broker.acked() >= 2).await;
    assert!(s.fired.lock().is_empty(), "nothing stale fired: {:?}", s.fired.lock());
    assert!(s.engine.stats().stale_dropped >= 2);
    s.clock.set(T0 + 5000);
    until("moved fires", || s.fired.lock().len() == 1).await;
    assert_eq!(s.fired.lock()[0].key, "moved");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn what_the_broker_loses_the_backstop_rescues_and_counts() {
    let config = EngineConfig {
        backstop_interval: Duration::from_millis(100),
        backstop_slack: Duration::from_millis(500),
        ..EngineConfig::default()
    };
    let s = start(config, None).await;
    s.broker.set_losing(true);
    let specs: Vec<_> = (0..50).map(|i| spec(&format!("lost{i}"), T0)).collect();
    s.engine.schedule_batch(specs).await.expect("schedule");
    until("published into the void", || s.broker.lost() == 50).await;
    s.clock.set(T0 + 1_000);
    until("rescued", || s.engine.stats().completed == 50).await;
    assert_eq!(s.engine.stats().backstop_rescued, 50);
    assert_eq!(s.fired.lock().len(), 50, "each rescued timer fired once");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_outbox_is_refused_with_a_clear_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let plain = Arc::new(SqliteStore::open(dir.path().join("o.db"), SqliteOptions::default()).await.expect("open"));
    let err = Engine::builder(plain)
        .external_trigger(Arc::new(LoopbackTrigger::new()) as Arc<dyn ExternalTrigger>)
        .start()
        .await
        .expect_err("must refuse");
    assert!(err.to_string().contains("outbox"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_published_again_from_the_outbox() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let broker = LoopbackTrigger::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let engine = Engine::builder(store(&dir).await)
        .clock(Arc::new(clock.clone()))
        .external_trigger(Arc::new(broker.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |_f: Firing| {
            let n = c.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 { Outcome::Retry { after: Duration::from_millis(200), error: "busy".into() } } else { Outcome::Done }
            }
        })
        .start()
        .await
        .expect("start");
    engine.schedule(spec("r", T0)).await.expect("schedule");
    until("first attempt", || calls.load(Ordering::SeqCst) == 1).await;
    clock.set(T0 + 200);
    until("second attempt", || calls.load(Ordering::SeqCst) == 2).await;
    until("done", || engine.stats().completed == 1).await;
    assert_eq!(engine.stats().backstop_rescued, 0, "the retry came back through the broker");
    assert_eq!(engine.stats().published, 2, "one notice per generation/due time");
}

/// A broker driven by hand: it keeps what is published and delivers only when the test says,
/// as one batch.
#[derive(Clone, Default)]
struct HandTrigger {
    published: Arc<parking_lot::Mutex<Vec<overdue_core::TimerRef>>>,
    sink: Arc<parking_lot::Mutex<Option<Arc<dyn overdue_core::DueSink>>>>,
}

impl std::fmt::Debug for HandTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HandTrigger").field("published", &self.published.lock().len()).finish_non_exhaustive()
    }
}

#[async_trait::async_trait]
impl ExternalTrigger for HandTrigger {
    fn name(&self) -> &'static str {
        "by-hand"
    }
    async fn start(&self) -> overdue_core::Result<()> {
        Ok(())
    }
    async fn publish(&self, notices: &[overdue_core::TimerRef], _now: i64) -> overdue_core::Result<()> {
        self.published.lock().extend_from_slice(notices);
        Ok(())
    }
    async fn consume(&self, sink: Arc<dyn overdue_core::DueSink>) -> overdue_core::Result<()> {
        *self.sink.lock() = Some(sink.clone());
        sink.until_stopped().await;
        Ok(())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_delivery_of_notices_due_apart_fires_each_at_its_own_due_time() {
    // A broker that hands over a batch spanning 800 ms of due times (a timer wheel releasing
    // several slots at once, or notices published ahead of their time): holding the batch until
    // its last notice is due would fire the first one 800 ms late.
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = ManualClock::new(T0);
    let broker = HandTrigger::default();
    let fired = Arc::new(parking_lot::Mutex::new(Vec::<Firing>::new()));
    let rec = fired.clone();
    let engine = Engine::builder(store(&dir).await)
        .clock(Arc::new(clock.clone()))
        .external_trigger(Arc::new(broker.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |f: Firing| {
            let rec = rec.clone();
            async move {
                rec.lock().push(f);
                Outcome::Done
            }
        })
        .start()
        .await
        .expect("start");
    engine.schedule_batch(vec![spec("soon", T0 + 100), spec("later", T0 + 900)]).await.expect("schedule");
    until("both notices published", || broker.published.lock().len() == 2).await;
    until("the consumer running", || broker.sink.lock().is_some()).await;
    let sink = broker.sink.lock().clone().expect("sink");
    let batch = broker.published.lock().clone();
    let delivery = tokio::spawn(async move { sink.deliver(batch).await });

    clock.set(T0 + 100);
    until("the first notice fired", || fired.lock().len() == 1).await;
    let first = fired.lock()[0].clone();
    assert_eq!((first.key.as_str(), first.fired_at), ("soon", T0 + 100), "fired at its own due time");
    clock.set(T0 + 899);
    engine.settle().await;
    assert_eq!(fired.lock().len(), 1, "the later notice is held until it is due");
    assert!(!delivery.is_finished(), "the delivery is answered only when all of it is settled");

    clock.set(T0 + 900);
    let answers = tokio::time::timeout(Duration::from_secs(10), delivery).await.expect("answered").expect("delivery task");
    assert_eq!(answers, vec![overdue_core::Delivery::Ack; 2]);
    let keys: Vec<(String, i64)> = fired.lock().iter().map(|f| (f.key.clone(), f.fired_at)).collect();
    assert_eq!(keys, [("soon".to_owned(), T0 + 100), ("later".to_owned(), T0 + 900)]);
    assert_eq!(engine.stats().backstop_rescued, 0);
}
