//! Injected time.
//!
//! Only [`SystemClock`] reads the wall clock. Everything else takes an `Arc<dyn Clock>`, so the
//! engine runs unchanged in virtual time under a [`ManualClock`] that tests move forward: a test
//! sets the time past a due time and the engine sees it at once, with no real sleeping.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use tokio::sync::watch;

/// A source of "now" in milliseconds since the Unix epoch, and a way to wait for a later now.
pub trait Clock: Send + Sync + fmt::Debug + 'static {
    /// Current time in milliseconds since the Unix epoch (UTC).
    fn now_ms(&self) -> i64;
    /// Completes once `now_ms() >= deadline_ms`. Never completes early.
    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()>;
}

/// The wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl SystemClock {
    fn now_micros() -> i128 {
        match SystemTime::now().duration_since(UNIX_EPOCH) {
            Ok(d) => d.as_micros() as i128,
            Err(e) => -(e.duration().as_micros() as i128),
        }
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        (Self::now_micros().div_euclid(1000)) as i64
    }

    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()> {
        Box::pin(async move {
            // Sleep in microseconds so that a wake-up lands just after the millisecond boundary
            // instead of up to a millisecond late; loop in case the wall clock was set back.
            loop {
                let remaining = deadline_ms as i128 * 1000 - Self::now_micros();
                if remaining <= 0 {
                    return;
                }
                tokio::time::sleep(Duration::from_micros(remaining as u64)).await;
            }
        })
    }
}

/// A clock that only moves when told to. Clones share the same time.
#[derive(Clone)]
pub struct ManualClock {
    now: Arc<watch::Sender<i64>>,
}

impl fmt::Debug for ManualClock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ManualClock").field("now_ms", &self.now_ms()).finish()
    }
}

impl ManualClock {
    /// A clock standing at `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        let (tx, _rx) = watch::channel(start_ms);
        ManualClock { now: Arc::new(tx) }
    }

    /// Moves time forward by `ms` (negative values are ignored: time never goes back).
    pub fn advance(&self, ms: i64) {
        self.now.send_modify(|now| *now += ms.max(0));
    }

    /// Sets the time; earlier values than the current one are ignored.
    pub fn set(&self, ms: i64) {
        self.now.send_modify(|now| *now = (*now).max(ms));
    }

    /// The current virtual time.
    pub fn now(&self) -> i64 {
        *self.now.borrow()
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now()
    }

    fn sleep_until(&self, deadline_ms: i64) -> BoxFuture<'static, ()> {
        let mut rx = self.now.subscribe();
        Box::pin(async move {
            loop {
                if *rx.borrow_and_update() >= deadline_ms {
                    return;
                }
                if rx.changed().await.is_err() {
                    // The clock is gone; nothing will ever move time again.
                    futures::future::pending::<()>().await;
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn manual_sleep_completes_only_when_time_reaches_the_deadline() {
        let clock = ManualClock::new(1_000);
        let mut sleep = clock.sleep_until(1_010);
        assert!(futures::poll!(&mut sleep).is_pending());
        clock.advance(9);
        tokio::task::yield_now().await;
        assert!(futures::poll!(&mut sleep).is_pending(), "at 1009 the 1010 sleep must still wait");
        clock.advance(1);
        sleep.await;
        assert_eq!(clock.now_ms(), 1_010);
    }

    #[test]
    fn manual_time_never_goes_back() {
        let clock = ManualClock::new(50);
        clock.set(10);
        clock.advance(-5);
        assert_eq!(clock.now(), 50);
    }

    #[test]
    fn system_clock_is_near_the_os_clock() {
        let os = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        assert!((SystemClock.now_ms() - os).abs() < 1_000);
    }
}
