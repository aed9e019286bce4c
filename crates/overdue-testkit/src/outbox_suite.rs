//! An engine over a SQL store with its outbox on, driven by the in-process loopback broker
//! ([`crate::loopback`]): notices go out through the outbox relay, come back through `deliver`,
//! are fenced by generation and acknowledged after the settlement commits; two nodes sharing one
//! database, each with its own relay and broker, fire every timer once. One body per case for
//! the PostgreSQL and MySQL stores' tests, which say how to open their store ([`OpenUrl`]) and
//! where a fresh database is (`url`, with `outbox=true` set or not as each case needs).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use futures::future::BoxFuture;
use overdue_core::{ExternalTrigger, Firing, ManualClock, Outcome, Store, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use parking_lot::Mutex;

use crate::T0;
use crate::loopback::LoopbackTrigger;

/// Opens the store at a URL (panicking if it cannot: these are tests).
pub type OpenUrl = fn(String) -> BoxFuture<'static, Arc<dyn Store>>;

/// How long a case waits for what the broker does in real time.
const WITHIN: Duration = Duration::from_secs(20);

async fn until(what: &str, cond: impl FnMut() -> bool) {
    crate::until(what, WITHIN, cond).await
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec::new("q", key, due_at).with_payload(key.as_bytes().to_vec())
}

async fn engine(
    open: OpenUrl,
    url: &str,
    clock: &ManualClock,
    broker: &LoopbackTrigger,
    outcome: impl Fn(&Firing) -> Outcome + Send + Sync + 'static,
) -> (Engine, Arc<Mutex<Vec<Firing>>>) {
    let store = open(url.to_owned()).await;
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

/// 200 due timers and one due later come back through the broker, none by the backstop, and the outbox drains. `url` has `outbox=true`.
pub async fn due_timers_come_back_through_the_broker_and_the_outbox_drains(
    open: OpenUrl,
    url: &str,
) {
    let clock = ManualClock::new(T0);
    let broker = LoopbackTrigger::new();
    let (engine, fired) = engine(open, url, &clock, &broker, |_| Outcome::Done).await;
    engine
        .schedule_batch((0..200).map(|i| spec(&format!("k{i}"), T0)).collect())
        .await
        .expect("schedule");
    // Due later (virtual time): published at once, held by the broker, fired when due.
    engine
        .schedule(spec("later", T0 + 300))
        .await
        .expect("schedule");
    until("200 completions", || engine.stats().completed == 200).await;
    clock.set(T0 + 300);
    until("the later one", || engine.stats().completed == 201).await;
    let st = engine.stats();
    assert_eq!(st.backstop_rescued, 0, "the broker delivered everything");
    assert_eq!(st.published, 201);
    assert_eq!(st.trigger, "loopback");
    assert_eq!(fired.lock().len(), 201, "each fired once");
    until("201 acks", || broker.acked() >= 201).await;
    assert!(
        engine
            .store()
            .outbox_fetch(10)
            .await
            .expect("outbox")
            .is_empty(),
        "outbox drained"
    );
}

/// A cancelled timer's notice is dropped by its generation; a retry goes out through the outbox again. `url` has `outbox=true`.
pub async fn a_cancelled_timer_is_fenced_and_a_retry_is_published_again(open: OpenUrl, url: &str) {
    let clock = ManualClock::new(T0);
    let broker = LoopbackTrigger::new();
    let calls = Arc::new(AtomicUsize::new(0));
    let c = calls.clone();
    let (engine, fired) = engine(open, url, &clock, &broker, move |f| {
        if f.key == "retried" && c.fetch_add(1, Ordering::SeqCst) == 0 {
            Outcome::Retry {
                after: Duration::from_millis(200),
                error: "busy".into(),
            }
        } else {
            Outcome::Done
        }
    })
    .await;
    engine
        .schedule(spec("cancelled", T0 + 500))
        .await
        .expect("schedule");
    engine
        .schedule(spec("retried", T0))
        .await
        .expect("schedule");
    until("both published", || broker.published() >= 2).await;
    assert!(engine.cancel("q", "cancelled").await.expect("cancel"));
    until("first attempt", || calls.load(Ordering::SeqCst) == 1).await;
    clock.set(T0 + 500);
    until("second attempt", || calls.load(Ordering::SeqCst) == 2).await;
    until("done", || engine.stats().completed == 1).await;
    until("the cancelled notice came back and was dropped", || {
        engine.stats().stale_dropped >= 1
    })
    .await;
    let st = engine.stats();
    assert_eq!(
        st.backstop_rescued, 0,
        "the retry came back through the broker"
    );
    assert_eq!(st.published, 3, "schedule, schedule, retry");
    assert!(
        fired.lock().iter().all(|f| f.key == "retried"),
        "nothing cancelled fired"
    );
}

/// Two nodes (`&node=n1`, `&node=n2` appended to `url`) relaying one outbox fire each of 200 timers once. `url` has `outbox=true`.
pub async fn two_nodes_relaying_one_outbox_fire_every_timer_once(open: OpenUrl, url: &str) {
    let clock = ManualClock::new(T0);
    let (b1, b2) = (LoopbackTrigger::new(), LoopbackTrigger::new());
    let (n1, f1) = engine(open, &format!("{url}&node=n1"), &clock, &b1, |_| {
        Outcome::Done
    })
    .await;
    let (n2, f2) = engine(open, &format!("{url}&node=n2"), &clock, &b2, |_| {
        Outcome::Done
    })
    .await;
    // Written through both nodes; either relay may publish any row (or both may: harmless).
    n1.schedule_batch((0..100).map(|i| spec(&format!("a{i}"), T0)).collect())
        .await
        .expect("schedule");
    n2.schedule_batch((0..100).map(|i| spec(&format!("b{i}"), T0)).collect())
        .await
        .expect("schedule");
    until("200 completions", || {
        n1.stats().completed + n2.stats().completed == 200
    })
    .await;
    let mut keys: Vec<String> = f1
        .lock()
        .iter()
        .chain(f2.lock().iter())
        .map(|f| f.key.clone())
        .collect();
    keys.sort();
    keys.dedup();
    assert_eq!(keys.len(), 200);
    assert_eq!(
        f1.lock().len() + f2.lock().len(),
        200,
        "no timer fired twice"
    );
    assert!(n1.stats().published + n2.stats().published >= 200);
    until("outbox drained", || b1.acked() + b2.acked() >= 200).await;
    assert!(
        n1.store()
            .outbox_fetch(10)
            .await
            .expect("outbox")
            .is_empty()
    );
}

/// An engine with an external trigger refuses a store whose outbox is off. `url` has no `outbox=true`.
pub async fn a_store_without_its_outbox_is_refused_by_an_external_trigger(
    open: OpenUrl,
    url: &str,
) {
    let plain = open(url.to_owned()).await;
    let err = Engine::builder(plain)
        .external_trigger(Arc::new(LoopbackTrigger::new()) as Arc<dyn ExternalTrigger>)
        .start()
        .await
        .expect_err("must refuse");
    assert!(err.to_string().contains("outbox=true"), "{err}");
}
