//! The engine side of an external trigger (a broker, Redis key expiry): the outbox relay, the
//! [`DueSink`] the trigger delivers into, and the consumer task. The design is in
//! `overdue_core::trigger`; in short: store commit → outbox row → relay publishes → broker waits
//! → `deliver` claims by generation, runs, settles → the trigger acknowledges.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use async_trait::async_trait;
use overdue_core::{Delivery, DueSink, ExternalTrigger, TimerRef};
use parking_lot::Mutex;
use tokio::sync::oneshot;

use crate::engine::Shared;

/// Notices claimed together out of one [`DueSink::deliver`] call (see [`deliver`]).
const DELIVER_CHUNK: usize = 1024;
/// Outbox rows published per round.
const RELAY_BATCH: u32 = 1000;
/// How often an idle relay looks at the outbox anyway (rows written by another node, or by a
/// process that died before relaying).
const RELAY_POLL: Duration = Duration::from_secs(1);
/// A notice that arrives at most this early is held until its due time; earlier ones go back to
/// the trigger to be published again for the rest of their delay.
pub(crate) const EARLY_HOLD_MS: i64 = 2_000;
/// Notices held for their due time are claimed in groups spanning at most this much of due
/// time (see [`hold_groups`]): the most a hold makes a notice late, against one claim per group.
pub(crate) const HOLD_GROUP_MS: i64 = 5;
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// `(queue, key, generation)` of a delivered notice whose outcome a trigger is waiting for.
pub(crate) type WaitKey = (String, String, u64);

/// Deliveries waiting for their settlement to commit. `true` = acknowledge.
#[derive(Debug, Default)]
pub(crate) struct Waiters {
    map: Mutex<HashMap<WaitKey, oneshot::Sender<bool>>>,
}

impl Waiters {
    fn register(&self, t: &TimerRef) -> oneshot::Receiver<bool> {
        let (tx, rx) = oneshot::channel();
        // A second delivery of the same generation while the first is running replaces the
        // first waiter; the first then answers `Redeliver` (its sender is dropped), which is
        // safe: the broker delivers again and the claim or the generation fence sorts it out.
        self.map.lock().insert((t.queue.clone(), t.key.clone(), t.generation), tx);
        rx
    }

    /// Called by the settler after a settlement committed.
    pub(crate) fn settled(&self, t: &TimerRef, ack: bool) {
        let mut map = self.map.lock();
        if map.is_empty() {
            return;
        }
        if let Some(tx) = map.remove(&(t.queue.clone(), t.key.clone(), t.generation)) {
            let _ = tx.send(ack);
        }
    }
}

/// Health of the external trigger's connection, as the trigger reports it.
#[derive(Debug)]
pub(crate) struct Health {
    pub(crate) healthy: bool,
    pub(crate) error: Option<String>,
}

/// What [`ExternalTrigger::consume`] delivers into.
pub(crate) struct Sink {
    pub(crate) shared: Arc<Shared>,
}

#[async_trait]
impl DueSink for Sink {
    async fn deliver(&self, notices: Vec<TimerRef>) -> Vec<Delivery> {
        deliver(&self.shared, notices).await
    }

    fn now_ms(&self) -> i64 {
        self.shared.clock.now_ms()
    }

    fn stopped(&self) -> bool {
        self.shared.stop_claiming.is_cancelled()
    }

    async fn until_stopped(&self) {
        self.shared.stop_claiming.cancelled().await
    }

    fn set_healthy(&self, healthy: bool, error: Option<String>) {
        let mut h = self.shared.trigger_health.lock();
        if h.healthy != healthy {
            match &error {
                Some(e) if !healthy => tracing::warn!(error = %e, "external trigger unhealthy"),
                _ => tracing::info!(healthy, "external trigger health changed"),
            }
        }
        metrics::gauge!("overdue_trigger_healthy").set(if healthy { 1.0 } else { 0.0 });
        *h = Health { healthy, error: if healthy { None } else { error } };
    }
}

/// Claims, fires and settles delivered notices; see [`DueSink::deliver`]. A delivery larger
/// than [`DELIVER_CHUNK`] (or than `max_in_flight`, whose permits one chunk takes at once) is
/// handled in chunks side by side, so no size a trigger hands over can wait for more permits
/// than exist.
async fn deliver(shared: &Arc<Shared>, mut notices: Vec<TimerRef>) -> Vec<Delivery> {
    let chunk = DELIVER_CHUNK.min(shared.cfg.max_in_flight).max(1);
    if notices.len() <= chunk {
        return deliver_chunk(shared, notices).await;
    }
    let mut parts = Vec::with_capacity(notices.len().div_ceil(chunk));
    while !notices.is_empty() {
        let rest = notices.split_off(chunk.min(notices.len()));
        parts.push(std::mem::replace(&mut notices, rest));
    }
    let answers = futures::future::join_all(parts.into_iter().map(|p| deliver_chunk(shared, p))).await;
    answers.into_iter().flatten().collect()
}

async fn deliver_chunk(shared: &Arc<Shared>, notices: Vec<TimerRef>) -> Vec<Delivery> {
    let n = notices.len();
    let mut out = vec![Delivery::Ack; n];
    if n == 0 {
        return out;
    }
    if shared.stop_claiming.is_cancelled() {
        return vec![Delivery::Redeliver; n];
    }
    // Too early to hold: back to the trigger for the rest of the delay.
    let now = shared.clock.now_ms();
    let mut take = Vec::with_capacity(n);
    for (i, t) in notices.into_iter().enumerate() {
        if t.due_at > now.saturating_add(EARLY_HOLD_MS) {
            out[i] = Delivery::Early;
        } else {
            take.push((i, t));
        }
    }
    let groups = hold_groups(take, now);
    let settled = futures::future::join_all(groups.into_iter().map(|g| settle_group(shared, g))).await;
    for (i, d) in settled.into_iter().flatten() {
        out[i] = d;
    }
    out
}

/// Splits notices (with their places in the delivery) into groups that are held, claimed and
/// fired together, in due order: what is due already is one group, fired at once; a group of
/// notices not yet due spans at most [`HOLD_GROUP_MS`] of due times, so holding it until its
/// last notice is due makes none of them later than that. (One hold for a whole delivery would
/// make its earliest notice as late as its latest is early: a broker that hands over a batch
/// spanning half a second would fire its first notice half a second late.)
fn hold_groups(mut take: Vec<(usize, TimerRef)>, now: i64) -> Vec<Vec<(usize, TimerRef)>> {
    take.sort_by_key(|(_, t)| t.due_at);
    let mut groups: Vec<Vec<(usize, TimerRef)>> = Vec::new();
    let mut window_end = i64::MIN;
    for item in take {
        match groups.last_mut() {
            Some(g) if item.1.due_at <= window_end => g.push(item),
            _ => {
                window_end = if item.1.due_at <= now { now } else { item.1.due_at.saturating_add(HOLD_GROUP_MS) };
                groups.push(vec![item]);
            }
        }
    }
    groups
}

/// Holds one group until its last notice is due, claims it, fires it and waits for every
/// settlement; returns each notice's answer at its place in the delivery.
async fn settle_group(shared: &Arc<Shared>, take: Vec<(usize, TimerRef)>) -> Vec<(usize, Delivery)> {
    let redeliver = |take: &[(usize, TimerRef)]| take.iter().map(|(i, _)| (*i, Delivery::Redeliver)).collect::<Vec<_>>();
    let hold_until = take.iter().map(|(_, t)| t.due_at).max().unwrap_or(i64::MIN);
    if hold_until > shared.clock.now_ms() {
        // Slightly early (the broker's resolution): wait on the engine's clock.
        tokio::select! {
            biased;
            _ = shared.stop_claiming.cancelled() => return redeliver(&take),
            _ = shared.clock.sleep_until(hold_until) => {}
        }
    }
    let refs: Vec<TimerRef> = take.iter().map(|(_, t)| t.clone()).collect();
    let k = refs.len();
    if !shared.take_permits(k).await {
        return redeliver(&take);
    }
    let now = shared.clock.now_ms();
    let lease_until = shared.lease_until(now);
    let claimed = match shared.store.claim(&refs, &shared.node_id, now, lease_until).await {
        Ok(c) => c,
        Err(e) => {
            shared.permits.add_permits(k);
            tracing::warn!(error = %e, n = k, "claiming delivered notices failed; the broker will deliver again");
            return redeliver(&take);
        }
    };
    shared.permits.add_permits(k - claimed.len());
    // Not claimed: stale (cancelled, replaced, already done) or held by another node's claim,
    // which fires it (or, if that node dies, the backstop does once its lease expires): ack.
    shared.stats.stale_dropped.fetch_add((k - claimed.len()) as u64, Relaxed);
    let mut out: Vec<(usize, Delivery)> = take.iter().map(|(i, _)| (*i, Delivery::Ack)).collect();
    let index: HashMap<(&str, &str, u64), usize> = take
        .iter()
        .enumerate()
        .map(|(j, (_, t))| ((t.queue.as_str(), t.key.as_str(), t.generation), j))
        .collect();
    let mut waits = Vec::with_capacity(claimed.len());
    for c in &claimed {
        if let Some(&j) = index.get(&(c.timer.queue.as_str(), c.timer.key.as_str(), c.timer.generation)) {
            waits.push((j, shared.waiters.register(&c.timer)));
        }
    }
    drop(index);
    shared.dispatch(claimed, lease_until);
    for (j, rx) in waits {
        out[j].1 = match rx.await {
            Ok(true) => Delivery::Ack,
            // Released (shutdown, or a claim that waited too long) or dropped unsettled.
            _ => Delivery::Redeliver,
        };
    }
    out
}

/// Moves outbox rows to the broker: fetch, publish (confirmed), acknowledge. Returns how many
/// notices it published.
pub(crate) async fn relay_round(shared: &Shared, trigger: &dyn ExternalTrigger) -> overdue_core::Result<usize> {
    let rows = shared.store.outbox_fetch(RELAY_BATCH).await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let (seqs, notices): (Vec<i64>, Vec<TimerRef>) = rows.into_iter().unzip();
    trigger.publish(&notices, shared.clock.now_ms()).await?;
    shared.store.outbox_ack(&seqs).await?;
    shared.stats.published.fetch_add(notices.len() as u64, Relaxed);
    metrics::counter!("overdue_notices_published_total").increment(notices.len() as u64);
    Ok(notices.len())
}

/// The relay task: publishes the outbox whenever something was written, and every
/// [`RELAY_POLL`] anyway.
pub(crate) async fn relay(shared: Arc<Shared>, trigger: Arc<dyn ExternalTrigger>) {
    let mut backoff = Duration::from_millis(50);
    loop {
        if shared.stop_claiming.is_cancelled() {
            break;
        }
        match relay_round(&shared, trigger.as_ref()).await {
            Ok(n) => {
                backoff = Duration::from_millis(50);
                if n == RELAY_BATCH as usize {
                    continue;
                }
                tokio::select! {
                    _ = shared.stop_claiming.cancelled() => break,
                    _ = shared.relay_wake.notified() => {}
                    _ = tokio::time::sleep(RELAY_POLL) => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, trigger = trigger.name(), "relaying the outbox failed; retrying");
                tokio::select! {
                    _ = shared.stop_claiming.cancelled() => break,
                    _ = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// The consumer task: runs the trigger's `consume` until the engine stops, restarting it with
/// backoff if it returns an error.
pub(crate) async fn consume(shared: Arc<Shared>, trigger: Arc<dyn ExternalTrigger>) {
    let sink: Arc<dyn DueSink> = Arc::new(Sink { shared: shared.clone() });
    let mut backoff = Duration::from_millis(100);
    loop {
        match trigger.consume(sink.clone()).await {
            Ok(()) => {
                if shared.stop_claiming.is_cancelled() {
                    break;
                }
            }
            Err(e) => {
                sink.set_healthy(false, Some(e.to_string()));
                tracing::error!(error = %e, trigger = trigger.name(), "external trigger consumer failed; restarting");
            }
        }
        tokio::select! {
            _ = shared.stop_claiming.cancelled() => break,
            _ = tokio::time::sleep(backoff) => {}
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_notices_are_grouped_by_due_time_and_what_is_due_goes_at_once() {
        let t = |k: &str, due_at| TimerRef { queue: "q".into(), key: k.into(), generation: 1, due_at };
        let now = 1_000;
        let take: Vec<(usize, TimerRef)> =
            [t("late", 400), t("w2", 1_300), t("due", 1_000), t("w1", 1_004), t("w1b", 1_005), t("w3", 1_306), t("w2b", 1_305)]
                .into_iter()
                .enumerate()
                .collect();
        let groups: Vec<Vec<String>> =
            hold_groups(take, now).iter().map(|g| g.iter().map(|(_, t)| t.key.clone()).collect()).collect();
        // What is due (or overdue) at once; then windows of HOLD_GROUP_MS from each one's first.
        assert_eq!(groups, vec![vec!["late", "due"], vec!["w1", "w1b"], vec!["w2", "w2b"], vec!["w3"]]);
        assert!(hold_groups(Vec::new(), now).is_empty());
    }
}
