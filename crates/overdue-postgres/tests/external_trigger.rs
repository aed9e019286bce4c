//! A real engine over the PostgreSQL store with its outbox on, driven by the in-process
//! loopback broker (`overdue_testkit::loopback`): notices go out through the outbox relay, come
//! back through `deliver`, are fenced by generation and acknowledged after the settlement
//! commits. Two nodes sharing one schema, each with its own relay and broker, fire every timer
//! once.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use overdue_core::{ExternalTrigger, Firing, ManualClock, Outcome, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_postgres::PgStore;
use overdue_testkit::T0;
use overdue_testkit::loopback::LoopbackTrigger;
use parking_lot::Mutex;

/// Polls `cond` every 10 ms until it holds or 20 s pass (the broker works in real time).
async fn until(what: &str, cond: impl Fn() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec::new("q", key, due_at).with_payload(key.as_bytes().to_vec())
}

async fn engine(url: &str, clock: &ManualClock, broker: &LoopbackTrigger, outcome: impl Fn(&Firing) -> Outcome + Send + Sync + 'static) -> (Engine, Arc<Mutex<Vec<Firing>>>) {
    let store = Arc::new(PgStore::open_url(url).await.expect("open"));
    let fired = Arc::new(Mutex::new(Vec::new()));
    let rec = fired.clone();
    let outcome = Arc::new(outcome);
    let engine = Engine::builder(store)
        .clock(Arc::new(clock.clone()))
        .config(EngineConfig::default())
        .external_trigger(Arc::new(broker.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |f: Firing| {
            let out = outcome(&f);
            rec.lock().push(f);
            async move { out }
        })
        .start()
        .await
        .expect("start");
    (engine, fired)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_timers_come_back_through_the_broker_and_the_outbox_drains() {
    let Some(url) = common::fresh_url("&outbox=true").await else { return };
    let clock = ManualClock::new(T0);
    let broker = LoopbackTrigger::new();
    let (engine, fired) = engine(&url, &clock, &broker, |_| Outcome::Done).await;
    engine.schedule_batch((0..200).map(|i| spec(&format!("k{i}"), T0)).collect()).await.expect("schedule");
    // Due later (virtual time): published at once, held by the broker, fired when due.
    engine.schedule(spec("later", T0 + 300)).await.expect("schedule");
    until("200 completions", || engine.stats().completed == 200).await;
    clock.set(T0 + 300);
    until("the later one", || engine.stats().completed == 201).await;
    let st = engine.stats();
    assert_eq!(st.backstop_rescued, 0, "the broker delivered everything");
    assert_eq!(st.published, 201);
    assert_eq!(st.trigger, "loopback");
    assert_eq!(fired.lock().len(), 201, "each fired once");
    until("201 acks", || broker.acked() >= 201).await;
    assert!(engine.store().outbox_fetch(10).await.expect("outbox").is_empty(), "outbox drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_timer_is_fenced_and_a_retry_is_published_again() {
    let Some(url) = common::fresh_url("&outbox=true").await else { return };
    let clock = ManualClock::new(T0);
    let broker = LoopbackTrigger::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (engine, fired) = engine(&url, &clock, &broker, move |f| {
        if f.key == "retried" && c.fetch_add(1, Ordering::SeqCst) == 0 {
            Outcome::Retry { after: Duration::from_millis(200), error: "busy".into() }
        } else {
            Outcome::Done
        }
    })
    .await;
    engine.schedule(spec("cancelled", T0 + 500)).await.expect("schedule");
    engine.schedule(spec("retried", T0)).await.expect("schedule");
    until("both published", || broker.published() >= 2).await;
    assert!(engine.cancel("q", "cancelled").await.expect("cancel"));
    until("first attempt", || calls.load(Ordering::SeqCst) == 1).await;
    clock.set(T0 + 500);
    until("second attempt", || calls.load(Ordering::SeqCst) == 2).await;
    until("done", || engine.stats().completed == 1).await;
    until("the cancelled notice came back and was dropped", || engine.stats().stale_dropped >= 1).await;
    let st = engine.stats();
    assert_eq!(st.backstop_rescued, 0, "the retry came back through the broker");
    assert_eq!(st.published, 3, "schedule, schedule, retry");
    assert!(fired.lock().iter().all(|f| f.key == "retried"), "nothing cancelled fired");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_relaying_one_outbox_fire_every_timer_once() {
    let Some(url) = common::fresh_url("&outbox=true").await else { return };
    let clock = ManualClock::new(T0);
    let (b1, b2) = (LoopbackTrigger::new(), LoopbackTrigger::new());
    let (n1, f1) = engine(&format!("{url}&node=n1"), &clock, &b1, |_| Outcome::Done).await;
    let (n2, f2) = engine(&format!("{url}&node=n2"), &clock, &b2, |_| Outcome::Done).await;
    // Written through both nodes; either relay may publish any row (or both may: harmless).
    n1.schedule_batch((0..100).map(|i| spec(&format!("a{i}"), T0)).collect()).await.expect("schedule");
    n2.schedule_batch((0..100).map(|i| spec(&format!("b{i}"), T0)).collect()).await.expect("schedule");
    until("200 completions", || n1.stats().completed + n2.stats().completed == 200).await;
    let mut keys: Vec<String> = f1.lock().iter().chain(f2.lock().iter()).map(|f| f.key.clone()).collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 200);
    assert_eq!(f1.lock().len() + f2.lock().len(), 200, "no timer fired twice");
    assert!(n1.stats().published + n2.stats().published >= 200);
    until("outbox drained", || b1.acked() + b2.acked() >= 200).await;
    assert!(n1.store().outbox_fetch(10).await.expect("outbox").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_its_outbox_is_refused_by_an_external_trigger() {
    let Some(url) = common::fresh_url("").await else { return };
    let plain = Arc::new(PgStore::open_url(&url).await.expect("open"));
    let err = Engine::builder(plain)
        .external_trigger(Arc::new(LoopbackTrigger::new()) as Arc<dyn ExternalTrigger>)
        .start()
        .await
        .expect_err("must refuse");
    assert!(err.to_string().contains("outbox=true"), "{err}");
}
