//! `GET /metrics`: one Prometheus recorder per process, plus gauges read at scrape time.
//!
//! The engine counts through the `metrics` facade as things happen
//! (`overdue_timers_{scheduled,fired,cancelled,completed}_total`, `overdue_fire_lateness_seconds`,
//! `overdue_handler_failures_total`, `overdue_dead_letters_total`,
//! `overdue_backstop_rescued_total`), and the HTTP layer counts requests. The order service
//! counts its committed transitions in memory (`OrderService::transitions_committed`), copied to
//! `overdue_order_transitions_total{kind}` at each scrape without a database read. What is state
//! rather than events is read from the store when Prometheus scrapes:
//!
//! | metric | labels | source |
//! |---|---|---|
//! | `overdue_timers_pending` (gauge) | `queue` | `engine.counts()` |
//! | `overdue_timers_in_flight` (gauge) | `queue` | `engine.counts()` |
//! | `overdue_dead_letters_stored` (gauge) | `queue` | `engine.counts()` |
//! | `overdue_orders` (gauge) | `status` | order service, every status (0 included) |
//!
//! The recorder is installed once per process ([`install`], a `OnceLock`), so several apps in
//! one process (tests) share it; gauges then show the app scraped last.

use std::collections::HashSet;
use std::sync::OnceLock;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use overdue_orders::OrderStatus;
use parking_lot::Mutex;

use crate::AppState;

/// Buckets of `overdue_fire_lateness_seconds`: 1 ms to 5 min.
const LATENESS_BUCKETS: &[f64] =
    &[0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];
/// Buckets of `overdue_http_request_duration_seconds`: 100 µs to 10 s.
const HTTP_BUCKETS: &[f64] = &[0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the Prometheus recorder as the process's `metrics` recorder, once; later calls
/// return the same handle. If another recorder was installed first, `/metrics` renders an
/// empty registry and a warning is logged.
pub(crate) fn install() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let builder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Full("overdue_fire_lateness_seconds".into()), LATENESS_BUCKETS)
            .and_then(|b| b.set_buckets_for_metric(Matcher::Full("overdue_http_request_duration_seconds".into()), HTTP_BUCKETS))
            .unwrap_or_else(|e| {
                tracing::warn!(error = %e, "histogram buckets refused; falling back to summaries");
                PrometheusBuilder::new()
            });
        let recorder = builder.build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_err() {
            tracing::warn!("another metrics recorder is already installed; /metrics will not see overdue's metrics");
        }
        describe();
        // Export the unlabelled counters from the start: a rescue count of 0 is information.
        metrics::counter!("overdue_backstop_rescued_total").increment(0);
        metrics::counter!("overdue_metrics_scrape_errors_total").increment(0);
        metrics::counter!("overdue_store_errors_total").increment(0);
        metrics::gauge!("overdue_store_healthy").set(1.0);
        handle
    })
}

/// Drains histogram samples into their buckets; the relay task calls it every few seconds so
/// memory stays bounded between scrapes.
pub(crate) fn upkeep() {
    if let Some(h) = HANDLE.get() {
        h.run_upkeep();
    }
}

fn describe() {
    use metrics::{describe_counter, describe_gauge, describe_histogram};
    describe_counter!("overdue_timers_scheduled_total", "Timers scheduled (upserts), per queue.");
    describe_counter!("overdue_timers_fired_total", "Firings handed to a handler, per queue.");
    describe_counter!("overdue_timers_cancelled_total", "Timers cancelled, per queue.");
    describe_counter!("overdue_timers_completed_total", "Firings whose handler finished (Done), per queue.");
    describe_histogram!("overdue_fire_lateness_seconds", metrics::Unit::Seconds, "How late after due_at a timer fired.");
    describe_counter!("overdue_handler_failures_total", "Failed handler attempts, per queue.");
    describe_counter!("overdue_dead_letters_total", "Timers moved to the dead letters, per queue.");
    describe_counter!("overdue_backstop_rescued_total", "Timers the backstop sweep fired because no trigger did.");
    describe_gauge!("overdue_timers_pending", "Stored timers not currently claimed, per queue.");
    describe_gauge!("overdue_timers_in_flight", "Timers claimed and not yet settled, per queue.");
    describe_gauge!("overdue_dead_letters_stored", "Dead letters waiting for a replay, per queue.");
    describe_gauge!("overdue_orders", "Orders per status.");
    describe_counter!("overdue_order_transitions_total", "Order transitions this process committed, per kind.");
    describe_counter!("overdue_http_requests_total", "HTTP requests, per method, route and status.");
    describe_histogram!("overdue_http_request_duration_seconds", metrics::Unit::Seconds, "HTTP request latency.");
    describe_counter!("overdue_metrics_scrape_errors_total", "Scrapes whose store-backed gauges could not be read.");
    describe_counter!("overdue_store_errors_total", "Store calls of the engine (loads, claims, scans, settlements) that failed.");
    describe_gauge!("overdue_store_healthy", "0 from a failed engine store call until the next one succeeds, else 1.");
}

/// Per-app scrape state: the queues seen before, so a queue that emptied shows 0, not its
/// last value.
#[derive(Debug, Default)]
pub(crate) struct Scrape {
    seen_queues: Mutex<HashSet<String>>,
}

impl Scrape {
    pub(crate) fn new() -> Self {
        Scrape::default()
    }
}

/// Refreshes the store-backed gauges and renders the Prometheus text. A store failure is
/// logged and counted; the event metrics are rendered anyway.
pub(crate) async fn render(state: &AppState) -> String {
    let handle = install();
    // In memory: exported even when the store reads below fail.
    for (kind, n) in state.orders.transitions_committed() {
        metrics::counter!("overdue_order_transitions_total", "kind" => kind).absolute(n);
    }
    if let Err(e) = refresh(state).await {
        tracing::warn!(error = %e, "metrics scrape could not read the store");
        metrics::counter!("overdue_metrics_scrape_errors_total").increment(1);
    }
    handle.render()
}

async fn refresh(state: &AppState) -> Result<(), String> {
    let raw = state.engine.counts().await.map_err(|e| e.to_string())?;
    // Summed per metric label: past the label cap, queues share one series (see queue_label).
    let mut counts: Vec<overdue::QueueCount> = Vec::new();
    for c in raw {
        let label = overdue::queue_label(&c.queue);
        match counts.iter_mut().find(|x| x.queue == label) {
            Some(x) => {
                x.pending += c.pending;
                x.in_flight += c.in_flight;
                x.dead += c.dead;
            }
            None => counts.push(overdue::QueueCount { queue: label, ..c }),
        }
    }
    {
        let mut seen = state.metrics.seen_queues.lock();
        let now: HashSet<String> = counts.iter().map(|c| c.queue.clone()).collect();
        for gone in seen.difference(&now) {
            for name in ["overdue_timers_pending", "overdue_timers_in_flight", "overdue_dead_letters_stored"] {
                metrics::gauge!(name, "queue" => gone.clone()).set(0.0);
            }
        }
        *seen = now;
    }
    for c in &counts {
        metrics::gauge!("overdue_timers_pending", "queue" => c.queue.clone()).set(c.pending as f64);
        metrics::gauge!("overdue_timers_in_flight", "queue" => c.queue.clone()).set(c.in_flight as f64);
        metrics::gauge!("overdue_dead_letters_stored", "queue" => c.queue.clone()).set(c.dead as f64);
    }
    let statuses = state.orders.status_counts().await.map_err(|e| e.to_string())?;
    for st in OrderStatus::ALL {
        let n = statuses.iter().find(|(s, _)| *s == st).map_or(0, |(_, n)| *n);
        metrics::gauge!("overdue_orders", "status" => st.as_str()).set(n as f64);
    }
    Ok(())
}
