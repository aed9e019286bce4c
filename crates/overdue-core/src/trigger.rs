//! [`ExternalTrigger`]: a wake-up source outside the process (RabbitMQ, Kafka, RocketMQ, Redis
//! key expiry), and the [`DueSink`] the engine hands it.
//!
//! ## How a broker trigger works
//!
//! A broker can wait, but it cannot be queried or withdrawn. So with an external trigger the
//! [`Store`](crate::Store) (a SQL store) stays the **source of truth**, and the broker only carries
//! *notices*: `(queue, key, generation, due_at)`, never the payload.
//!
//! 1. **Outbox.** The store is opened with its outbox on: every upsert (schedule, reschedule,
//!    replay, a retry's new due time) writes an outbox row in the same transaction. The engine's
//!    relay reads [`Store::outbox_fetch`](crate::Store::outbox_fetch), calls
//!    [`ExternalTrigger::publish`], and only after the broker has confirmed the batch calls
//!    [`Store::outbox_ack`](crate::Store::outbox_ack). A crash between commit and publish loses
//!    nothing: the rows are still there at restart. A crash between publish and ack publishes
//!    twice: harmless, see 3.
//! 2. **Waiting.** The broker holds the notice until about `due_at` (TTL queues, delay topics,
//!    timer messages, key expiry) — that is the trigger's design and its resolution.
//! 3. **Delivery.** [`ExternalTrigger::consume`] hands due notices to [`DueSink::deliver`]. The
//!    engine claims each one in the store, which succeeds only if the notice's generation is still
//!    the stored one (cancel and reschedule work by this fencing: a published message cannot be
//!    withdrawn, but a stale one is dropped here), runs the handler and settles the outcome. Only
//!    then does `deliver` return [`Delivery::Ack`] for it, and only then may the trigger
//!    acknowledge the message (ack after the effect commits). A crash before the ack makes the
//!    broker deliver again; the idempotent handler keeps the effect single.
//! 4. **Backstop.** Whatever the broker loses (a key-expiry event nobody heard, a message dropped
//!    by a broker without persistence) is still in the store: the engine's slow backstop sweep
//!    claims timers overdue by more than the backstop slack and fires them, counting each one in
//!    `overdue_backstop_rescued_total`.
//!
//! ## Writing a trigger
//!
//! Implement this trait in the backend's crate. `publish` must not return `Ok` before the broker
//! has made the notices durable (publisher confirms, `acks=all`, `SEND_OK`). `consume` runs until
//! [`DueSink::stopped`] turns true, reconnecting with backoff on its own when the broker goes away
//! (report it through [`DueSink::set_healthy`]); it returns `Err` only for a configuration error
//! that retrying cannot fix.

use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;

use crate::error::Result;
use crate::model::TimerRef;

/// What the trigger should do with one delivered notice, answered by [`DueSink::deliver`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Delivery {
    /// Done: the effect is committed (or retried later through a new outbox notice, or dead
    /// lettered), or the notice was stale (cancelled, replaced) and was dropped. Acknowledge it.
    Ack,
    /// Not handled this time (the engine is stopping, the store failed, another node holds the
    /// claim and may die with it). Do not acknowledge: let the broker deliver it again (nack
    /// with requeue, do not commit the offset). The backstop sweep covers it as well.
    Redeliver,
    /// It arrived before its due time by more than the engine waits (the broker's resolution
    /// was coarser than the delay left). Publish it again for the remaining delay (`due_at` is
    /// in the notice), then acknowledge this copy.
    Early,
}

/// The engine side of an external trigger.
#[async_trait]
pub trait DueSink: Send + Sync + 'static {
    /// Claims, fires and settles the notices; returns one [`Delivery`] per notice, in order.
    /// Returns once every notice's outcome is known (after the handlers ran and their outcomes
    /// were written), so callers may acknowledge as soon as it returns.
    async fn deliver(&self, notices: Vec<TimerRef>) -> Vec<Delivery>;

    /// The current time on the engine's clock (ms since the Unix epoch). Triggers compute
    /// remaining delays against it, so tests on a manual clock stay in virtual time.
    fn now_ms(&self) -> i64;

    /// True once the engine has stopped: `consume` should return.
    fn stopped(&self) -> bool;

    /// Resolves when the engine stops (for `select!` in the consume loop).
    async fn until_stopped(&self);

    /// Reports the connection state (shown in `/healthz` and metrics). `error` says why not.
    fn set_healthy(&self, healthy: bool, error: Option<String>);
}

/// A wake-up source outside the process. See the module docs.
#[async_trait]
pub trait ExternalTrigger: Send + Sync + fmt::Debug + 'static {
    /// Short name for logs and metrics, e.g. `amqp-dlx`.
    fn name(&self) -> &'static str;

    /// Connects, checks and declares what it needs (exchanges, queues, topics). An `Err` here
    /// stops the engine from starting: use [`crate::Error::Config`] with a message that says
    /// what to configure (a missing plugin, key-space events turned off).
    async fn start(&self) -> Result<()>;

    /// Publishes notices so that each comes back through `consume` at about its `due_at`;
    /// `now` is the engine's clock (ms), so the delay left is `due_at - now` (a manual clock in
    /// tests stays in virtual time). Returns `Ok` only once the broker has durably accepted
    /// every one. A notice may be published more than once; one already due is delivered as
    /// soon as possible.
    async fn publish(&self, notices: &[TimerRef], now: i64) -> Result<()>;

    /// Delivers due notices to `sink` until `sink.stopped()`; see the module docs.
    async fn consume(&self, sink: Arc<dyn DueSink>) -> Result<()>;
}

/// At most this many notices travel in one broker message (see [`encode_notices`]).
pub const NOTICES_PER_MESSAGE: usize = 128;

/// The body of a broker message that carries notices: a JSON array of
/// `{"queue","key","generation","due_at"}`, never the payload.
///
/// A broker's cost is per *message* (a confirm, a disk write, a dead-letter hop, a dequeue), not
/// per byte, so the triggers pack the notices of one publish that take the same path (the same
/// route, level or delivery slot) into one message of up to [`NOTICES_PER_MESSAGE`]. They wait
/// and arrive together, exactly as they would have one by one.
pub fn encode_notices(notices: &[&TimerRef]) -> Vec<u8> {
    // Serializing plain strings and integers cannot fail.
    serde_json::to_vec(notices).unwrap_or_default()
}

/// Groups items by the path they take (`key`), in the order each path is first seen, into
/// messages of at most [`NOTICES_PER_MESSAGE`] items: what every trigger's publish packs.
pub fn pack_by<K: Clone + Eq + std::hash::Hash, T>(items: impl IntoIterator<Item = (K, T)>) -> Vec<(K, Vec<T>)> {
    let mut out: Vec<(K, Vec<T>)> = Vec::new();
    let mut open: std::collections::HashMap<K, usize> = std::collections::HashMap::new();
    for (key, item) in items {
        match open.get(&key) {
            Some(&i) if out[i].1.len() < NOTICES_PER_MESSAGE => out[i].1.push(item),
            _ => {
                open.insert(key.clone(), out.len());
                out.push((key, vec![item]));
            }
        }
    }
    out
}

/// Reads a body written by [`encode_notices`], or a single notice object (the one-notice body
/// of earlier versions, still accepted so that messages already waiting in a broker keep
/// working). `Err` says why the body is not notices.
pub fn decode_notices(body: &[u8]) -> std::result::Result<Vec<TimerRef>, String> {
    let first = body.iter().find(|b| !b.is_ascii_whitespace());
    let decoded = if first == Some(&b'[') {
        serde_json::from_slice::<Vec<TimerRef>>(body)
    } else {
        serde_json::from_slice::<TimerRef>(body).map(|t| vec![t])
    };
    match decoded {
        Ok(v) if v.is_empty() => Err("an empty list of notices".into()),
        Ok(v) => Ok(v),
        Err(e) => Err(e.to_string()),
    }
}

/// What a trigger does with one message carrying several notices, given the engine's answers
/// to them ([`MessageOutcome::of`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MessageOutcome {
    /// Every notice is done (or stale): acknowledge the message.
    Ack,
    /// Publish the notices at these indices again for the rest of their delay (they came
    /// early), then acknowledge the message; if that publish fails, redeliver it instead.
    Republish(Vec<usize>),
    /// At least one notice was not handled: redeliver the whole message (nack with requeue, do
    /// not commit). The notices already done come back stale and are dropped by the generation
    /// fence; the early ones come back early again and are re-published then.
    Redeliver,
}

impl MessageOutcome {
    /// The outcome of a message from the answers to its notices, in order.
    pub fn of(answers: &[Delivery]) -> MessageOutcome {
        if answers.contains(&Delivery::Redeliver) {
            return MessageOutcome::Redeliver;
        }
        let early: Vec<usize> =
            answers.iter().enumerate().filter(|(_, a)| **a == Delivery::Early).map(|(i, _)| i).collect();
        if early.is_empty() { MessageOutcome::Ack } else { MessageOutcome::Republish(early) }
    }
}

/// The pause between two connection attempts of a trigger's consumer: waits `backoff` (cut
/// short when the engine stops), then doubles `backoff` up to `max`. `false` when the engine
/// stopped, so the consumer should return.
pub async fn reconnect_pause(sink: &dyn DueSink, backoff: &mut std::time::Duration, max: std::time::Duration) -> bool {
    let stopped = tokio::select! {
        _ = sink.until_stopped() => true,
        _ = tokio::time::sleep(*backoff) => false,
    };
    *backoff = (*backoff * 2).min(max);
    !stopped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(key: &str, generation: u64) -> TimerRef {
        TimerRef { queue: "order.close".into(), key: key.into(), generation, due_at: 1_700_000_000_000 }
    }

    #[test]
    fn notices_round_trip_as_a_json_array_and_a_single_object_is_still_read() {
        let (a, b) = (t("o-1", 7), t("o-\"2\"", 8));
        let body = encode_notices(&[&a, &b]);
        assert_eq!(
            String::from_utf8(body.clone()).expect("utf-8"),
            r#"[{"queue":"order.close","key":"o-1","generation":7,"due_at":1700000000000},{"queue":"order.close","key":"o-\"2\"","generation":8,"due_at":1700000000000}]"#
        );
        assert_eq!(decode_notices(&body), Ok(vec![a.clone(), b]));
        let one = br#" {"queue":"order.close","key":"o-1","generation":7,"due_at":1700000000000}"#;
        assert_eq!(decode_notices(one), Ok(vec![a]));
    }

    #[test]
    fn items_are_packed_by_key_in_first_seen_order_and_split_at_the_message_size() {
        let items = (0..NOTICES_PER_MESSAGE + 2).map(|i| (if i == 1 { "b" } else { "a" }, i));
        let packed = pack_by(items);
        let shape: Vec<(&str, usize)> = packed.iter().map(|(k, v)| (*k, v.len())).collect();
        assert_eq!(shape, vec![("a", NOTICES_PER_MESSAGE), ("b", 1), ("a", 1)]);
        assert_eq!(packed[0].1[..3], [0, 2, 3]);
    }

    #[test]
    fn bodies_that_are_not_notices_are_refused_with_a_reason() {
        for bad in [&b""[..], b"[]", b"{}", b"[1,2]", b"not json", br#"{"queue":"q","key":"k","generation":-1,"due_at":0}"#] {
            let e = decode_notices(bad).expect_err("refused");
            assert!(!e.is_empty(), "{bad:?}");
        }
    }

    #[test]
    fn a_message_is_acked_republished_or_redelivered_by_its_notices_answers() {
        use Delivery::*;
        assert_eq!(MessageOutcome::of(&[Ack, Ack]), MessageOutcome::Ack);
        assert_eq!(MessageOutcome::of(&[Ack, Early, Ack, Early]), MessageOutcome::Republish(vec![1, 3]));
        assert_eq!(MessageOutcome::of(&[Ack, Early, Redeliver]), MessageOutcome::Redeliver);
        assert_eq!(MessageOutcome::of(&[Redeliver]), MessageOutcome::Redeliver);
    }
}
