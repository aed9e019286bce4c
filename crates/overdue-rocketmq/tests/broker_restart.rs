//! The broker stops and starts again on the same store (`scripts/brokers.sh bounce rocketmq`)
//! while timers wait in it: the trigger reports itself unhealthy, the client reconnects, and
//! every timer fires exactly once — from the broker or, for anything it lost, from the backstop.
//! Its own test binary, so no other test of this crate talks to the broker while it is down
//! (cargo runs test binaries one after another). A guard runs `start` if the bounce failed
//! half-way. Skipped without the script's `bounce` command or a broker, unless `CI` is set.

mod common;

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::{Rocket, until};
use overdue_core::{Clock, ExternalTrigger, Firing, Outcome, SystemClock, TimerSpec};
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use overdue_rocketmq::Mode;

fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../scripts/brokers.sh")
}

/// Runs `scripts/brokers.sh ARGS`; `bounce` runs `OVERDUE_TEST_ROCKETMQ_BOUNCE` instead when set
/// (a shell command, for a broker started by hand).
fn brokers(args: &[&str]) -> (bool, String) {
    let mut cmd = Command::new("bash");
    match std::env::var("OVERDUE_TEST_ROCKETMQ_BOUNCE") {
        Ok(c) if args.first() == Some(&"bounce") => cmd.arg("-c").arg(c),
        _ => cmd.arg(script()).args(args),
    };
    match cmd.output() {
        Ok(o) => (o.status.success(), format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))),
        Err(e) => (false, e.to_string()),
    }
}

/// True when the script knows `bounce` (a restart on the same store).
fn bounce_supported() -> bool {
    std::env::var_os("OVERDUE_TEST_ROCKETMQ_BOUNCE").is_some() || std::fs::read_to_string(script()).is_ok_and(|s| s.contains("bounce"))
}

/// Makes sure the broker runs again when dropped (the shared broker is never left stopped).
struct StartAgain;

impl Drop for StartAgain {
    fn drop(&mut self) {
        let (ok, out) = brokers(&["start", "rocketmq"]);
        if !ok {
            eprintln!("could not start the RocketMQ broker again: run `scripts/brokers.sh start rocketmq`\n{out}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_loses_nothing_and_fires_nothing_twice() {
    if !bounce_supported() {
        assert!(std::env::var_os("CI").is_none(), "CI is set but scripts/brokers.sh has no `bounce` command");
        eprintln!("skipped: scripts/brokers.sh has no `bounce` (restart on the same store) command");
        return;
    }
    let Some(backend) = Rocket::fresh(Mode::Timer).await else { return };
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
    until("the consumer is consuming", Duration::from_secs(20), || trigger.consuming()).await;

    const N: usize = 200;
    let t0 = SystemClock.now_ms();
    // Due well after the bounce (a broker start takes several seconds).
    let specs: Vec<TimerSpec> = (0..N).map(|i| TimerSpec::new("q", format!("before-{i}"), t0 + 15_000 + i as i64 * 10)).collect();
    engine.schedule_batch(specs).await.expect("schedule");
    until("the notices were published", Duration::from_secs(10), || engine.stats().published >= N as u64).await;

    let guard = StartAgain;
    let (ok, out) = brokers(&["bounce", "rocketmq"]);
    assert!(ok, "bounce failed: {out}");
    drop(guard);
    // Timers scheduled right after the bounce: the outbox relay publishes them once the broker
    // takes them again.
    let during: Vec<TimerSpec> = (0..50).map(|i| TimerSpec::new("q", format!("during-{i}"), SystemClock.now_ms() + 2_000)).collect();
    engine.schedule_batch(during).await.expect("schedule after the bounce");
    let back = tokio::time::Instant::now();
    until("the consumer is back", Duration::from_secs(60), || {
        let s = engine.stats();
        if back.elapsed().as_millis() % 2_000 < 6 {
            eprintln!("{:?} after the bounce: healthy {} ({:?}), received {}", back.elapsed(), s.trigger_healthy, s.trigger_error, trigger.stats().received);
        }
        s.trigger_healthy && trigger.consuming()
    })
    .await;
    eprintln!("the consumer was back {:?} after the bounce", back.elapsed());

    until("every timer fired", Duration::from_secs(60), || engine.stats().completed >= N as u64 + 50).await;
    let mut per_key: HashMap<String, usize> = HashMap::new();
    for f in fired.lock().expect("lock").iter() {
        *per_key.entry(f.key.clone()).or_default() += 1;
    }
    assert_eq!(per_key.len(), N + 50, "nothing lost");
    assert!(per_key.values().all(|&n| n == 1), "nothing fired twice: {per_key:?}");
    let stats = engine.stats();
    assert!(trigger.stats().probe_failures >= 1, "the bounce was seen: {:?}", trigger.stats());
    eprintln!("after the restart: {stats:?}; trigger {:?}", trigger.stats());
    // And the broker path works again: a new timer comes through it, not the backstop.
    let rescued = stats.backstop_rescued;
    engine.schedule(TimerSpec::new("q", "after", SystemClock.now_ms() + 1_000)).await.expect("schedule");
    until("the timer after the restart fired", Duration::from_secs(15), || engine.stats().completed == N as u64 + 51).await;
    assert_eq!(engine.stats().backstop_rescued, rescued, "it came through the broker");
    engine.shutdown(Duration::from_secs(5)).await;
}
