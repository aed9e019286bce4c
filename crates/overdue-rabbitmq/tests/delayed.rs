//! The delayed-message-exchange plugin (`amqp://…?mode=delayed`). On a broker without the plugin
//! (these machines), starting must fail with a clear configuration error that names the plugin
//! and suggests `mode=dlx`. With `OVERDUE_TEST_AMQP_DELAYED=1` against a broker that has the
//! plugin enabled, the conformance suite and a real-clock firing run instead.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Amqp, Fresh, delayed_enabled, until};
use overdue_core::{Clock, Error, ExternalTrigger, Firing, Outcome, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_rabbitmq::{AmqpTrigger, DELAYED_PLUGIN, Mode};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_plugin_start_fails_naming_it_and_suggesting_dlx() {
    if delayed_enabled() {
        return;
    }
    let Some(fresh) = Fresh::new(Mode::Delayed).await else { return };
    let trigger = fresh.trigger();
    let err = trigger.start().await.expect_err("mode=delayed started on a broker without the plugin");
    let msg = err.to_string();
    assert!(matches!(err, Error::Config(_)), "{err:?}");
    assert!(msg.contains(DELAYED_PLUGIN) && msg.contains("mode=dlx"), "{msg}");
    assert!(!msg.contains("guest:guest"), "the password is printed: {msg}");
    // The same through the URL and the engine: it refuses to start.
    let url = format!("{}?mode=delayed&prefix={}", common::server_url(), fresh.prefix);
    let t = AmqpTrigger::from_url(&url).expect("url");
    let dir = tempfile::tempdir().expect("tempdir");
    let store = overdue_sql::SqliteStore::open(dir.path().join("o.db"), overdue_sql::SqliteOptions { outbox: true, ..Default::default() })
        .await
        .expect("open");
    let started = Engine::builder(Arc::new(store)).external_trigger(Arc::new(t) as Arc<dyn ExternalTrigger>).start().await;
    let err = started.expect_err("the engine started without the plugin");
    assert!(err.to_string().contains(DELAYED_PLUGIN), "{err}");
}

mod conformance {
    overdue_testkit::conformance_tests!(match super::delayed_enabled() {
        true => match super::Amqp::fresh(overdue_rabbitmq::Mode::Delayed).await {
            Some(backend) => backend,
            None => return,
        },
        false => return,
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_plugin_a_short_timer_behind_a_long_one_fires_on_time() {
    if !delayed_enabled() {
        eprintln!("skipped: set OVERDUE_TEST_AMQP_DELAYED=1 against a broker with {DELAYED_PLUGIN}");
        return;
    }
    let Some(backend) = Amqp::fresh(Mode::Delayed).await else { return };
    let trigger = backend.fresh.trigger();
    let fired: Arc<Mutex<Vec<Firing>>> = Arc::default();
    let rec = fired.clone();
    let engine = Engine::builder(Arc::new(backend.store().await))
        .clock(Arc::new(SystemClock))
        .config(EngineConfig::default())
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |f: Firing| {
            rec.lock().expect("lock").push(f);
            async { Outcome::Done }
        })
        .start()
        .await
        .expect("start");
    let t0 = SystemClock.now_ms();
    engine.schedule(TimerSpec::new("q", "three", t0 + 3_000)).await.expect("schedule");
    engine.schedule(TimerSpec::new("q", "one", t0 + 1_000)).await.expect("schedule");
    until("both fired", Duration::from_secs(8), || fired.lock().expect("lock").len() == 2).await;
    let f = fired.lock().expect("lock").clone();
    assert_eq!(f[0].key, "one", "{f:?}");
    for x in &f {
        let late = x.fired_at - x.due_at;
        assert!((0..500).contains(&late), "{} fired {late} ms late", x.key);
    }
    assert_eq!(engine.stats().backstop_rescued, 0, "{:?}", engine.stats());
    engine.shutdown(Duration::from_secs(5)).await;
}
