//! The outbox relay: delivers the order service's notifications (`outbox` rows committed with
//! the transition that caused them, e.g. a payment reminder) to the webhook URL.
//!
//! Every `outbox_interval` (default 200 ms) a pass takes up to [`OUTBOX_BATCH`] pending messages,
//! POSTs each (at most [`OUTBOX_CONCURRENCY`] at once, signed like callbacks, with
//! `X-Overdue-Topic` and `X-Overdue-Message-Id`), marks the 2xx ones delivered and the others
//! failed. With no webhook URL a message is logged at info level and counts as delivered.
//! Delivery is at least once: a crash between the POST and the mark re-sends the message, so
//! receivers de-duplicate by message id. While deliveries fail, passes back off (doubling up to
//! [`MAX_BACKOFF`]) so a dead receiver is not hammered.
//!
//! The webhook body is `{"id":…, "topic":…, "created_at":…, "attempts":…, "payload":{…}}`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use overdue_orders::{OrderError, OutboxMessage};
use serde::Serialize;
use serde_json::value::RawValue;
use tokio::sync::watch;

use crate::AppState;
use crate::callback::{MESSAGE_ID_HEADER, TOPIC_HEADER, headers};

/// Messages taken per pass.
pub(crate) const OUTBOX_BATCH: u32 = 100;
/// Deliveries in flight at once.
pub(crate) const OUTBOX_CONCURRENCY: usize = 8;
/// Longest pause between passes while deliveries fail.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// How often the relay task also runs the metrics recorder's upkeep.
const UPKEEP_EVERY: Duration = Duration::from_secs(5);

/// What one pass did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct Pass {
    pub(crate) delivered: usize,
    pub(crate) failed: usize,
    /// True if the batch was full: more may be waiting.
    pub(crate) full: bool,
}

#[derive(Serialize)]
struct WebhookBody<'a> {
    id: i64,
    topic: &'a str,
    created_at: i64,
    attempts: u32,
    payload: Payload<'a>,
}

#[derive(Serialize)]
#[serde(untagged)]
enum Payload<'a> {
    Json(&'a RawValue),
    Text(&'a str),
}

/// Runs relay passes until `stop` turns true.
pub(crate) async fn run(state: Arc<AppState>, interval: Duration, mut stop: watch::Receiver<bool>) {
    let mut delay = interval;
    let mut last_upkeep = Instant::now();
    loop {
        match pass(&state).await {
            // Back off only when nothing got through: one receiver refusing one message must not
            // slow the delivery of all the others (failed messages sort behind fresh ones).
            Ok(p) if p.failed == 0 || p.delivered > 0 => delay = if p.full { Duration::ZERO } else { interval },
            Ok(p) => {
                delay = (delay.max(interval) * 2).min(MAX_BACKOFF);
                tracing::warn!(failed = p.failed, retry_in = ?delay, "outbox deliveries failed");
            }
            Err(e) => {
                delay = (delay.max(interval) * 2).min(MAX_BACKOFF);
                tracing::warn!(error = %e, retry_in = ?delay, "outbox relay pass failed");
            }
        }
        if last_upkeep.elapsed() >= UPKEEP_EVERY {
            crate::metrics_export::upkeep();
            last_upkeep = Instant::now();
        }
        tokio::select! {
            _ = stop.wait_for(|s| *s) => return,
            _ = tokio::time::sleep(delay) => {}
        }
    }
}

/// One pass: take, deliver, mark. Passes never overlap.
pub(crate) async fn pass(state: &AppState) -> Result<Pass, OrderError> {
    let _one_at_a_time = state.relay_lock.lock().await;
    let msgs = state.orders.outbox_pending(OUTBOX_BATCH).await?;
    let full = msgs.len() as u32 >= OUTBOX_BATCH;
    let Some(url) = state.webhook_url.as_deref() else {
        for m in &msgs {
            tracing::info!(id = m.id, topic = %m.topic, payload = %m.payload, "outbox message (no webhook url configured)");
        }
        let ids: Vec<i64> = msgs.iter().map(|m| m.id).collect();
        if !ids.is_empty() {
            state.orders.outbox_delivered(&ids).await?;
        }
        return Ok(Pass { delivered: ids.len(), failed: 0, full });
    };
    let results: Vec<(i64, Result<(), String>)> = futures::stream::iter(msgs)
        .map(|m| async move { (m.id, deliver(state, url, &m).await) })
        .buffer_unordered(OUTBOX_CONCURRENCY)
        .collect()
        .await;
    let mut delivered = Vec::new();
    let mut failed = Vec::new();
    for (id, r) in results {
        match r {
            Ok(()) => delivered.push(id),
            Err(e) => {
                tracing::debug!(id, error = %e, "webhook delivery failed");
                failed.push(id);
            }
        }
    }
    // Delivered first: if marking them fails they are re-sent (at least once), never lost.
    if !delivered.is_empty() {
        state.orders.outbox_delivered(&delivered).await?;
    }
    for &id in &failed {
        // Only a counter: a failure to count it does not change what is delivered next.
        if let Err(e) = state.orders.outbox_failed(id).await {
            tracing::warn!(id, error = %e, "could not count a failed webhook delivery");
        }
    }
    Ok(Pass { delivered: delivered.len(), failed: failed.len(), full })
}

async fn deliver(state: &AppState, url: &str, m: &OutboxMessage) -> Result<(), String> {
    let raw: Option<Box<RawValue>> = serde_json::from_str(&m.payload).ok();
    let payload = match &raw {
        Some(r) => Payload::Json(r),
        None => Payload::Text(&m.payload),
    };
    let body = WebhookBody { id: m.id, topic: &m.topic, created_at: m.created_at, attempts: m.attempts, payload };
    let body = serde_json::to_vec(&body).map_err(|e| format!("cannot encode message {}: {e}", m.id))?;
    let id = m.id.to_string();
    let hs = headers(&[(TOPIC_HEADER, &m.topic), (MESSAGE_ID_HEADER, &id)])?;
    state.delivery.post(url, body, hs).await
}
