//! [`LoopbackTrigger`]: an in-process stand-in for a broker, implementing
//! [`ExternalTrigger`] exactly as the real ones must (publish, wait in real time, deliver,
//! acknowledge only after the engine answers). It tests the engine's external-trigger path —
//! outbox relay, generation fencing, ack after settle, redelivery, early arrivals, backstop —
//! without a broker, and is the reference a real trigger's tests can be compared with.
//!
//! [`LoopbackTrigger::set_losing`] makes it drop every notice it is given, like a broker that
//! loses messages (or a Redis key-expiry event nobody heard): the backstop must then rescue them.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use async_trait::async_trait;
use overdue_core::{Delivery, DueSink, ExternalTrigger, Result, TimerRef};
use parking_lot::Mutex;
use tokio::sync::mpsc;

/// Most notices handed to the engine in one `deliver` call.
const DELIVER_BATCH: usize = 256;
/// Pause before a notice answered `Redeliver` comes back.
const REDELIVER_AFTER: Duration = Duration::from_millis(50);

/// An in-process broker; see the module docs.
#[derive(Clone)]
pub struct LoopbackTrigger {
    inner: Arc<Inner>,
}

struct Inner {
    tx: mpsc::UnboundedSender<TimerRef>,
    rx: Mutex<Option<mpsc::UnboundedReceiver<TimerRef>>>,
    losing: AtomicBool,
    published: AtomicU64,
    lost: AtomicU64,
    acked: AtomicU64,
    redelivered: AtomicU64,
}

impl std::fmt::Debug for LoopbackTrigger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LoopbackTrigger")
            .field("published", &self.published())
            .field("lost", &self.lost())
            .field("acked", &self.acked())
            .finish_non_exhaustive()
    }
}

impl Default for LoopbackTrigger {
    fn default() -> Self {
        Self::new()
    }
}

impl LoopbackTrigger {
    /// A loopback broker: a notice published at engine time `t` for `due_at` comes back after
    /// `due_at - t` real milliseconds.
    pub fn new() -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        LoopbackTrigger {
            inner: Arc::new(Inner {
                tx,
                rx: Mutex::new(Some(rx)),
                losing: AtomicBool::new(false),
                published: AtomicU64::new(0),
                lost: AtomicU64::new(0),
                acked: AtomicU64::new(0),
                redelivered: AtomicU64::new(0),
            }),
        }
    }

    /// While on, every published notice is dropped (and counted in [`Self::lost`]).
    pub fn set_losing(&self, losing: bool) {
        self.inner.losing.store(losing, Relaxed);
    }

    /// Notices accepted by `publish` (including lost ones).
    pub fn published(&self) -> u64 {
        self.inner.published.load(Relaxed)
    }

    /// Notices dropped while losing.
    pub fn lost(&self) -> u64 {
        self.inner.lost.load(Relaxed)
    }

    /// Deliveries the engine answered `Ack`.
    pub fn acked(&self) -> u64 {
        self.inner.acked.load(Relaxed)
    }

    /// Deliveries the engine answered `Redeliver`.
    pub fn redelivered(&self) -> u64 {
        self.inner.redelivered.load(Relaxed)
    }

    fn enqueue(&self, notice: TimerRef, delay: Duration) {
        let tx = self.inner.tx.clone();
        if delay.is_zero() {
            let _ = tx.send(notice);
            return;
        }
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            let _ = tx.send(notice);
        });
    }

    fn delay_of(notice: &TimerRef, now: i64) -> Duration {
        Duration::from_millis(notice.due_at.saturating_sub(now).max(0) as u64)
    }
}

#[async_trait]
impl ExternalTrigger for LoopbackTrigger {
    fn name(&self) -> &'static str {
        "loopback"
    }

    async fn start(&self) -> Result<()> {
        Ok(())
    }

    async fn publish(&self, notices: &[TimerRef], now: i64) -> Result<()> {
        for n in notices {
            self.inner.published.fetch_add(1, Relaxed);
            if self.inner.losing.load(Relaxed) {
                self.inner.lost.fetch_add(1, Relaxed);
                continue;
            }
            self.enqueue(n.clone(), Self::delay_of(n, now));
        }
        Ok(())
    }

    async fn consume(&self, sink: Arc<dyn DueSink>) -> Result<()> {
        let Some(mut rx) = self.inner.rx.lock().take() else {
            return Err(overdue_core::Error::Config("the loopback trigger has one consumer".into()));
        };
        sink.set_healthy(true, None);
        loop {
            let first = tokio::select! {
                biased;
                _ = sink.until_stopped() => break,
                n = rx.recv() => match n { Some(n) => n, None => break },
            };
            let mut batch = vec![first];
            while batch.len() < DELIVER_BATCH {
                match rx.try_recv() {
                    Ok(n) => batch.push(n),
                    Err(_) => break,
                }
            }
            let answers = sink.deliver(batch.clone()).await;
            for (notice, answer) in batch.into_iter().zip(answers) {
                match answer {
                    Delivery::Ack => {
                        self.inner.acked.fetch_add(1, Relaxed);
                    }
                    Delivery::Redeliver => {
                        self.inner.redelivered.fetch_add(1, Relaxed);
                        self.enqueue(notice, REDELIVER_AFTER);
                    }
                    Delivery::Early => {
                        let delay = Self::delay_of(&notice, sink.now_ms());
                        self.enqueue(notice, delay);
                    }
                }
            }
        }
        // Hand the receiver back so a restarted consumer (same trigger) can go on.
        *self.inner.rx.lock() = Some(rx);
        Ok(())
    }
}
