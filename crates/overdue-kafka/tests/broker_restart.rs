//! The broker stops and starts again on the same store (`scripts/brokers.sh stop kafka`, then
//! `bounce kafka`) while timers wait in its level topics: the trigger reports itself unhealthy,
//! librdkafka reconnects, timers scheduled meanwhile wait in the outbox, and every timer fires
//! exactly once — from the topics or, for anything lost, from the backstop. Its own test binary,
//! so no other test of this crate talks to the broker while it is down (cargo runs test binaries
//! one after another). A guard starts the broker again even if the test fails. Needs the
//! project's broker script and a broker it started; skipped without them unless `CI` is set.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Kafka, until};
use overdue_core::{Clock, ExternalTrigger, Firing, Outcome, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/brokers.sh")
}

fn brokers(args: &[&str]) -> bool {
    Command::new("bash").arg(script()).args(args).output().is_ok_and(|o| o.status.success())
}

/// Starts the broker again on its store when dropped (the shared broker is never left stopped).
struct StartAgain;

impl Drop for StartAgain {
    fn drop(&mut self) {
        if !brokers(&["bounce", "kafka"]) {
            eprintln!("could not start the Kafka broker again: run scripts/brokers.sh bounce kafka");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_and_fires_nothing_twice() {
    let Some(backend) = Kafka::fresh().await else { return };
    let pid = std::env::var("OVERDUE_BROKERS_DIR").map(PathBuf::from).unwrap_or_else(|_| "/tmp/overdue-brokers".into()).join("tansu.pid");
    if !pid.exists() {
        assert!(std::env::var_os("CI").is_none(), "CI is set but the broker was not started by scripts/brokers.sh ({})", pid.display());
        eprintln!("skipped: the Kafka broker was not started by scripts/brokers.sh, so this test cannot restart it");
        return;
    }
    let trigger = backend.fresh.trigger();
    let fired: Arc<Mutex<Vec<Firing>>> = Arc::default();
    let rec = fired.clone();
    let config = EngineConfig { backstop_interval: Duration::from_millis(500), ..EngineConfig::default() };
    let engine = Engine::builder(Arc::new(backend.store().await))
        .clock(Arc::new(SystemClock))
        .config(config)
        .external_trigger(Arc::new(trigger.clone()) as Arc<dyn ExternalTrigger>)
        .handler("q", QueueConfig::default(), move |f: Firing| {
            rec.lock().expect("lock").push(f);
            async { Outcome::Done }
        })
        .start()
        .await
        .expect("start");
    until("the consumer has partitions", Duration::from_secs(20), || trigger.consuming()).await;

    const N: usize = 200;
    const DURING: usize = 50;
    // Long enough for the broker to stop, start and take the group back before the timers are
    // due (about 10-20 s here), so they come through the topics, not the backstop.
    const DUE_IN: i64 = 30_000;
    let t0 = SystemClock.now_ms();
    let specs: Vec<TimerSpec> = (0..N).map(|i| TimerSpec::new("q", format!("before-{i}"), t0 + DUE_IN + i as i64 * 10)).collect();
    engine.schedule_batch(specs).await.expect("schedule");
    until("the notices were published", Duration::from_secs(10), || engine.stats().published >= N as u64).await;

    let guard = StartAgain;
    assert!(brokers(&["stop", "kafka"]), "scripts/brokers.sh stop kafka failed");
    until("the engine shows the trigger unhealthy", Duration::from_secs(30), || !engine.stats().trigger_healthy).await;
    // Timers scheduled while the broker is down wait in the outbox.
    let during: Vec<TimerSpec> = (0..DURING).map(|i| TimerSpec::new("q", format!("during-{i}"), t0 + DUE_IN + 1_000)).collect();
    engine.schedule_batch(during).await.expect("schedule while the broker is down");
    assert!(brokers(&["bounce", "kafka"]), "scripts/brokers.sh bounce kafka failed");
    drop(guard);
    let down_at = SystemClock.now_ms();
    until("the trigger is healthy again", Duration::from_secs(60), || engine.stats().trigger_healthy).await;
    until("the consumer has partitions again", Duration::from_secs(60), || trigger.consuming()).await;
    eprintln!("back {} ms after the restart began, {} ms before the first timer is due", SystemClock.now_ms() - down_at, t0 + DUE_IN - SystemClock.now_ms());

    until("every timer fired", Duration::from_secs(60), || engine.stats().completed >= (N + DURING) as u64).await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for f in fired.lock().expect("lock").iter() {
        *per_key.entry(f.key.clone()).or_default() += 1;
    }
    assert_eq!(per_key.len(), N + DURING, "nothing lost");
    assert!(per_key.values().all(|&n| n == 1), "nothing fired twice: {per_key:?}");
    let stats = engine.stats();
    eprintln!("after the restart: {stats:?}; trigger {:?}", trigger.stats());
    // The notices written before the stop survived it in the topics and came back through them.
    assert!(trigger.stats().received >= N as u64, "{:?}", trigger.stats());
    assert!(stats.backstop_rescued <= ((N + DURING) / 10) as u64, "the broker carried the load: {stats:?}");
    // And the broker path works again: a new timer comes through it, not the backstop.
    let rescued = stats.backstop_rescued;
    engine.schedule(TimerSpec::new("q", "after", SystemClock.now_ms() + 1_500)).await.expect("schedule");
    until("the timer after the restart fired", Duration::from_secs(20), || engine.stats().completed == (N + DURING + 1) as u64).await;
    assert_eq!(engine.stats().backstop_rescued, rescued, "it came through the broker");
    engine.shutdown(Duration::from_secs(5)).await;
}
