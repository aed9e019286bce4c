//! How fast one trigger publishes notices (each answered `SEND_OK`): `cargo run --release -p
//! overdue-rocketmq --example rocketmq_publish_rate -- [N] [BATCH] [DELAY_MS] [MODE]` against the name
//! server on 127.0.0.1:9876 (a fresh prefix, its topic deleted afterwards). MODE is `timer`
//! (default) or `levels`; DELAY_MS 0 publishes without a delay.

use std::time::Instant;

use overdue_core::{ExternalTrigger, TimerRef};
use overdue_rocketmq::{Mode, RocketOptions, RocketTrigger};

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> overdue_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let batch: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000);
    let delay: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(3_600_000);
    let mode = match args.next().as_deref() {
        Some("levels") => Mode::Levels,
        _ => Mode::Timer,
    };
    let prefix = format!("overdue-publish-rate-{}", std::process::id());
    let trigger = RocketTrigger::new(RocketOptions { prefix, mode, ..RocketOptions::default() });
    trigger.start().await?;
    let now = 1_700_000_000_000;
    let notices: Vec<TimerRef> =
        (0..n).map(|i| TimerRef { queue: "q".into(), key: format!("k{i}"), generation: i as u64, due_at: now + delay }).collect();
    let started = Instant::now();
    for chunk in notices.chunks(batch) {
        trigger.publish(chunk, now).await?;
    }
    let secs = started.elapsed().as_secs_f64();
    println!("{mode:?}: {n} notices due in {delay} ms, in batches of {batch}: {secs:.2} s, {:.0} /s", n as f64 / secs);
    trigger.purge().await?;
    trigger.close().await;
    Ok(())
}
