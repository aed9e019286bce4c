//! Counters and the lateness histogram every engine keeps, exported both as a snapshot
//! ([`EngineStats`]) and through the `metrics` facade (a Prometheus exporter installed by the
//! binary turns them into `/metrics`).

use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use hdrhistogram::Histogram;
use parking_lot::Mutex;

/// Largest lateness the histogram resolves: one day, in milliseconds.
const LATENESS_MAX_MS: u64 = 24 * 3_600_000;

/// A point-in-time copy of an engine's counters.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineStats {
    pub scheduled: u64,
    pub cancelled: u64,
    /// Firings handed to a handler.
    pub fired: u64,
    pub completed: u64,
    pub retried: u64,
    pub dead_lettered: u64,
    /// Handler failures (Fail, Retry, timeout or panic).
    pub handler_failures: u64,
    /// Wake-ups dropped because the claim failed (cancelled, replaced, or claimed elsewhere).
    pub stale_dropped: u64,
    /// Timers fired by the backstop sweep instead of the trigger.
    pub backstop_rescued: u64,
    /// Claims given back unrun because they waited in their queue until the handler could
    /// have outlived the lease (a sign of a queue whose handlers are too slow for its load).
    pub lease_releases: u64,
    /// Due wake-ups waiting unclaimed because their queue is at its claim cap
    /// (`concurrency × 4` claimed and unsettled).
    pub deferred: u64,
    /// Claimed and not yet settled.
    pub in_flight: u64,
    /// Timer references held in memory by the wheel/heap.
    pub resident: u64,
    /// Notices an external trigger's relay published to its broker (0 without one).
    pub published: u64,
    /// The wake-up mechanism: `wheel`, `heap`, `scan`, or the external trigger's name.
    pub trigger: String,
    /// False while the external trigger reports its broker unreachable (always true for the
    /// in-process triggers).
    pub trigger_healthy: bool,
    /// Why the external trigger is unhealthy, if it is.
    pub trigger_error: Option<String>,
    /// Store calls of the engine (loads, claims, scans, settlements) that failed since start.
    pub store_errors: u64,
    /// False from a failed store call until the next one succeeds: the database is unreachable
    /// or refusing work. The engine keeps retrying with backoff meanwhile; nothing is dropped.
    pub store_healthy: bool,
    /// The last store error while unhealthy.
    pub store_error: Option<String>,
    pub lateness: LatenessSummary,
    /// Lateness of the firings of the last [`RECENT_WINDOW`] to twice that (two windows that
    /// take turns), for a live view; `count` 0 when nothing fired lately.
    pub recent_lateness: LatenessSummary,
}

/// Length of one of the two windows behind [`EngineStats::recent_lateness`].
pub const RECENT_WINDOW: std::time::Duration = std::time::Duration::from_secs(30);

/// Lateness percentiles in milliseconds, over every firing since start.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LatenessSummary {
    pub count: u64,
    pub p50_ms: u64,
    pub p90_ms: u64,
    pub p99_ms: u64,
    pub max_ms: u64,
    pub mean_ms: f64,
}

/// Most distinct queue names used as metric labels; later queues share the label
/// [`OTHER_QUEUES`]. Queue names come from API clients (generic timers), and every distinct
/// label is a time series kept forever by the exporter and by Prometheus.
pub const MAX_QUEUE_LABELS: usize = 256;
/// The metric label of queues beyond [`MAX_QUEUE_LABELS`].
pub const OTHER_QUEUES: &str = "_other";

/// The `queue` label for `queue`: its name for the first [`MAX_QUEUE_LABELS`] distinct queues
/// seen by this process, [`OTHER_QUEUES`] after that.
pub fn queue_label(queue: &str) -> String {
    static SEEN: std::sync::OnceLock<parking_lot::RwLock<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    let seen = SEEN.get_or_init(Default::default);
    if seen.read().contains(queue) {
        return queue.to_owned();
    }
    let mut w = seen.write();
    if w.contains(queue) || w.len() < MAX_QUEUE_LABELS {
        w.insert(queue.to_owned());
        queue.to_owned()
    } else {
        OTHER_QUEUES.to_owned()
    }
}

#[derive(Debug)]
pub(crate) struct Stats {
    pub(crate) scheduled: AtomicU64,
    pub(crate) cancelled: AtomicU64,
    pub(crate) fired: AtomicU64,
    pub(crate) completed: AtomicU64,
    pub(crate) retried: AtomicU64,
    pub(crate) dead_lettered: AtomicU64,
    pub(crate) handler_failures: AtomicU64,
    pub(crate) stale_dropped: AtomicU64,
    pub(crate) backstop_rescued: AtomicU64,
    pub(crate) lease_releases: AtomicU64,
    pub(crate) deferred: AtomicU64,
    pub(crate) in_flight: AtomicU64,
    pub(crate) resident: AtomicU64,
    pub(crate) published: AtomicU64,
    pub(crate) store_errors: AtomicU64,
    /// Set by a failed store call, cleared by the next success (the fast path reads only this).
    store_unhealthy: std::sync::atomic::AtomicBool,
    /// `Some(message)` from a failed store call until the next success.
    store_error: Mutex<Option<String>>,
    lateness: Mutex<Lateness>,
}

/// Every firing's lateness since start, and the recent ones in two windows that take turns.
#[derive(Debug)]
struct Lateness {
    total: Histogram<u64>,
    current: Histogram<u64>,
    previous: Histogram<u64>,
    /// When `current` started collecting.
    since: std::time::Instant,
}

impl Lateness {
    fn new() -> Self {
        let hist = || {
            Histogram::new_with_max(LATENESS_MAX_MS, 3)
                .unwrap_or_else(|_| Histogram::new(3).unwrap_or_else(|_| unreachable!("3 significant figures is valid")))
        };
        Lateness { total: hist(), current: hist(), previous: hist(), since: std::time::Instant::now() }
    }

    /// Moves to a new window when the current one is over; forgets both after two idle windows.
    fn turn(&mut self, now: std::time::Instant) {
        let age = now.saturating_duration_since(self.since);
        if age >= RECENT_WINDOW {
            if age >= 2 * RECENT_WINDOW {
                self.previous.reset();
            } else {
                std::mem::swap(&mut self.previous, &mut self.current);
            }
            self.current.reset();
            self.since = now;
        }
    }

    fn record(&mut self, ms: u64, now: std::time::Instant) {
        self.turn(now);
        self.total.saturating_record(ms);
        self.current.saturating_record(ms);
    }

    fn recent(&mut self, now: std::time::Instant) -> LatenessSummary {
        self.turn(now);
        let mut both = self.previous.clone();
        // Same bounds on both, so adding cannot fail.
        let _ = both.add(&self.current);
        summary(&both)
    }
}

fn summary(h: &Histogram<u64>) -> LatenessSummary {
    LatenessSummary {
        count: h.len(),
        p50_ms: h.value_at_quantile(0.50),
        p90_ms: h.value_at_quantile(0.90),
        p99_ms: h.value_at_quantile(0.99),
        max_ms: h.max(),
        mean_ms: h.mean(),
    }
}

impl Stats {
    pub(crate) fn new() -> Self {
        Stats {
            scheduled: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            fired: AtomicU64::new(0),
            completed: AtomicU64::new(0),
            retried: AtomicU64::new(0),
            dead_lettered: AtomicU64::new(0),
            handler_failures: AtomicU64::new(0),
            stale_dropped: AtomicU64::new(0),
            backstop_rescued: AtomicU64::new(0),
            lease_releases: AtomicU64::new(0),
            deferred: AtomicU64::new(0),
            in_flight: AtomicU64::new(0),
            resident: AtomicU64::new(0),
            published: AtomicU64::new(0),
            store_errors: AtomicU64::new(0),
            store_unhealthy: std::sync::atomic::AtomicBool::new(false),
            store_error: Mutex::new(None),
            lateness: Mutex::new(Lateness::new()),
        }
    }

    pub(crate) fn record_fire(&self, queue: &str, lateness_ms: i64) {
        let ms = lateness_ms.max(0) as u64;
        self.fired.fetch_add(1, Relaxed);
        // The clock is read before the lock is taken, not while holding it.
        let now = std::time::Instant::now();
        self.lateness.lock().record(ms.min(LATENESS_MAX_MS), now);
        let label = queue_label(queue);
        metrics::counter!("overdue_timers_fired_total", "queue" => label.clone()).increment(1);
        metrics::histogram!("overdue_fire_lateness_seconds", "queue" => label).record(ms as f64 / 1000.0);
    }

    /// Notes the result of a store call: errors are counted and make the store unhealthy until
    /// the next success.
    pub(crate) fn store_result<T>(&self, r: &overdue_core::Result<T>) {
        match r {
            // The common case, on every claim and settlement: one relaxed load, no lock.
            Ok(_) if !self.store_unhealthy.load(Relaxed) => {}
            Ok(_) => {
                self.store_unhealthy.store(false, Relaxed);
                let mut cur = self.store_error.lock();
                if cur.is_some() {
                    *cur = None;
                    metrics::gauge!("overdue_store_healthy").set(1.0);
                    tracing::info!("the store answers again");
                }
            }
            Err(e) => {
                self.store_errors.fetch_add(1, Relaxed);
                metrics::counter!("overdue_store_errors_total").increment(1);
                metrics::gauge!("overdue_store_healthy").set(0.0);
                *self.store_error.lock() = Some(e.to_string());
                // After the message: a success racing with this failure then either sees the
                // flag and clears both, or misses it and leaves both set for the next success.
                self.store_unhealthy.store(true, Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> EngineStats {
        let mut h = self.lateness.lock();
        let lateness = summary(&h.total);
        let recent_lateness = h.recent(std::time::Instant::now());
        drop(h);
        let store_error = self.store_error.lock().clone();
        EngineStats {
            scheduled: self.scheduled.load(Relaxed),
            cancelled: self.cancelled.load(Relaxed),
            fired: self.fired.load(Relaxed),
            completed: self.completed.load(Relaxed),
            retried: self.retried.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
            handler_failures: self.handler_failures.load(Relaxed),
            stale_dropped: self.stale_dropped.load(Relaxed),
            backstop_rescued: self.backstop_rescued.load(Relaxed),
            lease_releases: self.lease_releases.load(Relaxed),
            deferred: self.deferred.load(Relaxed),
            in_flight: self.in_flight.load(Relaxed),
            resident: self.resident.load(Relaxed),
            published: self.published.load(Relaxed),
            trigger: String::new(),
            trigger_healthy: true,
            trigger_error: None,
            store_errors: self.store_errors.load(Relaxed),
            store_healthy: store_error.is_none(),
            store_error,
            lateness,
            recent_lateness,
        }
    }

    /// Forgets the lateness recorded so far (benchmarks measure one phase at a time).
    pub(crate) fn reset_lateness(&self) {
        let mut h = self.lateness.lock();
        h.total.reset();
        h.current.reset();
        h.previous.reset();
    }
}

#[cfg(test)]
mod lateness_tests {
    use super::*;
    use std::time::Instant;

    #[test]
    fn recent_lateness_covers_one_to_two_windows_and_total_everything() {
        let start = Instant::now();
        let mut l = Lateness::new();
        l.since = start;
        l.record(500, start);
        l.record(10, start + RECENT_WINDOW / 2);
        assert_eq!((l.recent(start + RECENT_WINDOW / 2).count, l.recent(start).max_ms), (2, 500));
        // One window on, the first window's firings are still shown (as the previous window)…
        l.record(20, start + RECENT_WINDOW + RECENT_WINDOW / 4);
        let r = l.recent(start + RECENT_WINDOW + RECENT_WINDOW / 4);
        assert_eq!((r.count, r.max_ms), (3, 500));
        // …and forgotten a window later; the total keeps everything.
        let r = l.recent(start + 2 * RECENT_WINDOW + RECENT_WINDOW / 4);
        assert_eq!((r.count, r.max_ms), (1, 20));
        assert_eq!(summary(&l.total).count, 3);
        // Idle for two windows: nothing recent at all.
        assert_eq!(l.recent(start + 10 * RECENT_WINDOW).count, 0);
        assert_eq!(summary(&l.total).max_ms, 500);
    }
}

#[cfg(test)]
mod label_tests {
    use super::*;

    #[test]
    fn queue_labels_are_capped_and_stable() {
        let names: Vec<String> = (0..MAX_QUEUE_LABELS + 10).map(|i| format!("label-test-{i}")).collect();
        let labels: Vec<String> = names.iter().map(|n| queue_label(n)).collect();
        let own = labels.iter().zip(&names).filter(|(l, n)| l == n).count();
        assert!(own <= MAX_QUEUE_LABELS, "{own} distinct labels");
        assert!(labels.iter().filter(|l| *l == OTHER_QUEUES).count() >= 10);
        // A queue that got its own label keeps it; one that did not stays folded.
        for (n, l) in names.iter().zip(&labels) {
            assert_eq!(&queue_label(n), l);
        }
    }
}
