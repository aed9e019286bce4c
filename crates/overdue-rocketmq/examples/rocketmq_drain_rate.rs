//! How fast one consumer drains the due topic without an engine (a sink that acknowledges
//! everything): `cargo run --release -p overdue-rocketmq --example rocketmq_drain_rate -- [N] [DELAY_MS]
//! [MODE]`. Publishes N notices due DELAY_MS from now, then reports when they arrived.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use overdue_core::{Delivery, DueSink, ExternalTrigger, TimerRef};
use overdue_rocketmq::{Mode, RocketOptions, RocketTrigger};

#[derive(Default)]
struct Count {
    n: AtomicUsize,
    stopped: AtomicBool,
    stop: tokio::sync::Notify,
}

#[async_trait::async_trait]
impl DueSink for Count {
    async fn deliver(&self, notices: Vec<TimerRef>) -> Vec<Delivery> {
        self.n.fetch_add(notices.len(), Ordering::Relaxed);
        vec![Delivery::Ack; notices.len()]
    }
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0)
    }
    fn stopped(&self) -> bool {
        self.stopped.load(Ordering::SeqCst)
    }
    async fn until_stopped(&self) {
        let n = self.stop.notified();
        if !self.stopped() {
            n.await;
        }
    }
    fn set_healthy(&self, _: bool, _: Option<String>) {}
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> overdue_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(10_000);
    let delay: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let mode = match args.next().as_deref() {
        Some("levels") => Mode::Levels,
        _ => Mode::Timer,
    };
    let prefix = format!("overdue-drain-rate-{}", std::process::id());
    let trigger = RocketTrigger::new(RocketOptions { prefix, mode, ..RocketOptions::default() });
    trigger.start().await?;
    let sink = Arc::new(Count::default());
    let consumer = tokio::spawn({
        let (t, s) = (trigger.clone(), sink.clone());
        async move { t.consume(s).await }
    });
    while !trigger.consuming() {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let now = sink.now_ms();
    let notices: Vec<TimerRef> =
        (0..n).map(|i| TimerRef { queue: "q".into(), key: format!("k{i}"), generation: 1, due_at: now + delay }).collect();
    let started = Instant::now();
    for chunk in notices.chunks(1_000) {
        trigger.publish(chunk, now).await?;
    }
    let published = started.elapsed().as_secs_f64();
    let deadline = Instant::now() + Duration::from_secs(300);
    let mut first = None;
    while sink.n.load(Ordering::Relaxed) < n && Instant::now() < deadline {
        if first.is_none() && sink.n.load(Ordering::Relaxed) > 0 {
            first = Some(started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let all = started.elapsed().as_secs_f64();
    let got = sink.n.load(Ordering::Relaxed);
    let from = first.unwrap_or(all).max(delay as f64 / 1000.0);
    println!(
        "{mode:?}: {n} due in {delay} ms: published by {published:.2} s; {got} received by {all:.2} s ({:.0} /s after the first arrival or the due time); {:?}",
        got as f64 / (all - from).max(0.001),
        trigger.stats()
    );
    sink.stopped.store(true, Ordering::SeqCst);
    sink.stop.notify_waiters();
    let _ = consumer.await;
    trigger.purge().await?;
    trigger.close().await;
    Ok(())
}
