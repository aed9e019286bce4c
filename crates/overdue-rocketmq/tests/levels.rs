//! The 18 delay levels (`rocketmq://…?mode=levels`): the whole conformance suite, and a timer
//! between levels that travels in hops (largest level that fits, then the rest) and fires on
//! time. Under `CI` an unreachable broker fails these tests; elsewhere it skips them.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Rocket, until};
use overdue_core::{Clock, ExternalTrigger, Firing, Outcome, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_rocketmq::Mode;

mod conformance {
    overdue_testkit::conformance_tests!(match super::Rocket::fresh(overdue_rocketmq::Mode::Levels).await {
        Some(backend) => backend,
        None => return,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timer_between_levels_hops_and_fires_on_time() {
    let Some(backend) = Rocket::fresh(Mode::Levels).await else { return };
    let trigger = backend.fresh.trigger();
    let fired: Arc<Mutex<Vec<Firing>>> = Arc::default();
    let rec = fired.clone();
    let engine = Engine::builder(Arc::new(backend.store().await))
        .clock(Arc::new(SystemClock))
        .config(EngineConfig::default())
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig { jitter: 0.0, ..QueueConfig::default() }, move |f: Firing| {
            rec.lock().expect("lock").push(f);
            async { Outcome::Done }
        })
        .start()
        .await
        .expect("start");
    until("the consumer is consuming", Duration::from_secs(20), || trigger.consuming()).await;
    let t0 = SystemClock.now_ms();
    // 8.5 s: level 2 (5 s), back 3.5 s early → level 1 (1 s), back 2.5 s early → level 1,
    // back 1.5 s early → held by the engine until due.
    engine.schedule(TimerSpec::new("q", "eight", t0 + 8_500)).await.expect("schedule");
    engine.schedule(TimerSpec::new("q", "one", t0 + 1_000)).await.expect("schedule");
    until("both fired", Duration::from_secs(20), || fired.lock().expect("lock").len() == 2).await;
    let f = fired.lock().expect("lock").clone();
    assert_eq!(f[0].key, "one", "{f:?}");
    for x in &f {
        let late = x.fired_at - x.due_at;
        assert!((0..1_500).contains(&late), "{} fired {late} ms late", x.key);
    }
    let stats = trigger.stats();
    assert!(stats.early >= 2, "the 8.5 s timer hopped: {stats:?}");
    assert_eq!(engine.stats().backstop_rescued, 0, "{:?}", engine.stats());
    engine.shutdown(Duration::from_secs(5)).await;
}
