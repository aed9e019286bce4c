//! The broker stops and starts again (`rabbitmqctl stop_app` / `start_app`) while timers wait in
//! it: the trigger reports itself unhealthy, reconnects with backoff, declares its topology again,
//! and every timer fires exactly once — from the broker's durable queues or, for anything lost,
//! from the backstop. Its own test binary, so no other test of this crate talks to the broker
//! while it is down (cargo runs test binaries one after another). A guard starts the broker
//! again even if the test fails. Skipped without `rabbitmqctl` or a broker, unless `CI` is set.

mod common;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Amqp, until};
use overdue_core::{Clock, ExternalTrigger, Firing, Outcome, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_rabbitmq::{AmqpOptions, AmqpTrigger, Mode};

fn rabbitmqctl(args: &[&str]) -> bool {
    Command::new("rabbitmqctl").args(args).output().is_ok_and(|o| o.status.success())
}

/// Starts the broker's app again when dropped (the shared broker is never left stopped).
struct StartAgain;

impl Drop for StartAgain {
    fn drop(&mut self) {
        for _ in 0..5 {
            if rabbitmqctl(&["-q", "start_app"]) {
                return;
            }
            std::thread::sleep(Duration::from_secs(1));
        }
        eprintln!("could not start the RabbitMQ app again: run `rabbitmqctl start_app`");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_and_fires_nothing_twice() {
    if !rabbitmqctl(&["-q", "status"]) {
        assert!(std::env::var_os("CI").is_none(), "CI is set but rabbitmqctl cannot reach the broker");
        eprintln!("skipped: rabbitmqctl is not available here");
        return;
    }
    let Some(backend) = Amqp::fresh(Mode::Dlx).await else { return };
    let opts = AmqpOptions { reconnect_min: Duration::from_millis(200), ..backend.fresh.options() };
    let trigger = AmqpTrigger::new(&common::server_url(), opts);
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
    until("the consumer is consuming", Duration::from_secs(10), || trigger.consuming()).await;

    const N: usize = 200;
    let t0 = SystemClock.now_ms();
    let specs: Vec<TimerSpec> = (0..N).map(|i| TimerSpec::new("q", format!("before-{i}"), t0 + 4_000 + i as i64 * 10)).collect();
    engine.schedule_batch(specs).await.expect("schedule");
    until("the notices were published", Duration::from_secs(5), || engine.stats().published >= N as u64).await;

    let guard = StartAgain;
    assert!(rabbitmqctl(&["-q", "stop_app"]), "rabbitmqctl stop_app failed");
    until("the engine shows the trigger unhealthy", Duration::from_secs(15), || !engine.stats().trigger_healthy).await;
    // Timers scheduled while the broker is down wait in the outbox.
    let during: Vec<TimerSpec> = (0..50).map(|i| TimerSpec::new("q", format!("during-{i}"), t0 + 5_000)).collect();
    engine.schedule_batch(during).await.expect("schedule while the broker is down");
    assert!(rabbitmqctl(&["-q", "start_app"]), "rabbitmqctl start_app failed");
    drop(guard);
    until("the consumer is back", Duration::from_secs(30), || engine.stats().trigger_healthy && trigger.consuming()).await;

    until("every timer fired", Duration::from_secs(30), || engine.stats().completed >= N as u64 + 50).await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for f in fired.lock().expect("lock").iter() {
        *per_key.entry(f.key.clone()).or_default() += 1;
    }
    assert_eq!(per_key.len(), N + 50, "nothing lost");
    assert!(per_key.values().all(|&n| n == 1), "nothing fired twice: {per_key:?}");
    let stats = engine.stats();
    assert!(trigger.stats().consumer_connections >= 2, "{:?}", trigger.stats());
    eprintln!("after the restart: {stats:?}; trigger {:?}", trigger.stats());
    // And the broker path works again: a new timer comes through it, not the backstop.
    let rescued = stats.backstop_rescued;
    engine.schedule(TimerSpec::new("q", "after", SystemClock.now_ms() + 500)).await.expect("schedule");
    until("the timer after the restart fired", Duration::from_secs(10), || engine.stats().completed == N as u64 + 51).await;
    assert_eq!(engine.stats().backstop_rescued, rescued, "it came through the broker");
    engine.shutdown(Duration::from_secs(5)).await;
}
