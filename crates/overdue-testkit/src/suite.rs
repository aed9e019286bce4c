//! The clauses of the timer contract, one function each. See the crate docs for how a backend
//! runs them. Every assertion message names the backend.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use overdue_core::limits::{MAX_BATCH, MAX_DELAY_MS, YEAR_MS};
use overdue_core::{DeadLetterQuery, Error, ListQuery, Outcome, TimerRef, TimerSpec, TimerState};
use overdue_engine::QueueConfig;

use crate::{Backend, Harness, ManualClock, Q, T0};

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec::new(Q, key, due_at)
}

fn no_jitter() -> QueueConfig {
    QueueConfig { jitter: 0.0, ..QueueConfig::default() }
}

/// A timer fires once, at its due time: not a millisecond before, and with the firing's fields
/// (payload, generation, attempt, due and fired times) right.
pub async fn fires_at_due_time_never_early(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    let generation = h.engine.schedule(spec("a", T0 + 1_000).with_payload(b"hello".to_vec())).await.expect("schedule");
    h.at(T0 + 999).await;
    assert!(h.recorder.is_empty(), "{n}: fired before its due time: {:?}", h.recorder.firings());
    h.at(T0 + 1_000).await;
    let f = h.recorder.firings();
    assert_eq!(f.len(), 1, "{n}: expected exactly one firing at the due time, got {f:?}");
    assert_eq!((f[0].key.as_str(), f[0].payload.as_slice(), f[0].generation, f[0].attempt), ("a", &b"hello"[..], generation, 1), "{n}");
    assert_eq!(f[0].due_at, T0 + 1_000, "{n}");
    assert!(f[0].fired_at >= f[0].due_at, "{n}: fired_at {} before due_at {}", f[0].fired_at, f[0].due_at);
    h.at(T0 + 60_000).await;
    assert_eq!(h.recorder.len(), 1, "{n}: a done timer fired again");
    assert!(h.engine.get(Q, "a").await.expect("get").is_none(), "{n}: a done timer is still stored");
    let stats = h.engine.stats();
    assert_eq!((stats.fired, stats.completed, stats.in_flight), (1, 1, 0), "{n}: {stats:?}");
}

/// A due time in the past (even the epoch) fires at the next pass, without moving the clock.
pub async fn past_due_fires_at_once(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    h.engine.schedule(spec("epoch", 0)).await.expect("schedule");
    h.engine.schedule(spec("hour-ago", T0 - 3_600_000)).await.expect("schedule");
    h.engine.schedule(spec("now", T0)).await.expect("schedule");
    h.engine.settle().await;
    let mut keys = h.recorder.keys();
    keys.sort();
    assert_eq!(keys, ["epoch", "hour-ago", "now"], "{n}");
}

/// Scheduling an existing key replaces it: new payload and due time, larger generation, and
/// only the new version fires.
pub async fn upsert_replaces_payload_and_bumps_generation(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    let g1 = h.engine.schedule(spec("k", T0 + 1_000).with_payload(b"v1".to_vec())).await.expect("schedule");
    let g2 = h.engine.schedule(spec("k", T0 + 2_000).with_payload(b"v2".to_vec())).await.expect("upsert");
    assert!(g2 > g1, "{n}: generation did not grow on upsert: {g1} then {g2}");
    let t = h.engine.get(Q, "k").await.expect("get").expect("stored");
    assert_eq!((t.generation, t.due_at, t.payload.as_slice(), t.attempts), (g2, T0 + 2_000, &b"v2"[..], 0), "{n}");
    assert_eq!(t.state, TimerState::Pending, "{n}");
    h.at(T0 + 1_500).await;
    assert!(h.recorder.is_empty(), "{n}: the replaced version fired: {:?}", h.recorder.firings());
    h.at(T0 + 2_000).await;
    let f = h.recorder.firings();
    assert_eq!(f.len(), 1, "{n}: {f:?}");
    assert_eq!((f[0].generation, f[0].payload.as_slice()), (g2, &b"v2"[..]), "{n}");
    // Moving a timer earlier by upsert works too.
    h.engine.schedule(spec("m", T0 + 50_000)).await.expect("schedule");
    h.engine.schedule(spec("m", T0 + 3_000)).await.expect("upsert earlier");
    h.at(T0 + 3_000).await;
    assert_eq!(h.recorder.keys(), ["k", "m"], "{n}");
}

/// A cancelled timer never fires; cancelling twice reports that nothing was there.
pub async fn cancel_prevents_firing(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    h.engine.schedule(spec("c", T0 + 1_000)).await.expect("schedule");
    h.engine.schedule(spec("keep", T0 + 1_000)).await.expect("schedule");
    assert!(h.engine.cancel(Q, "c").await.expect("cancel"), "{n}: cancel of a stored timer returned false");
    assert!(!h.engine.cancel(Q, "c").await.expect("cancel"), "{n}: second cancel returned true");
    assert!(!h.engine.cancel(Q, "never").await.expect("cancel"), "{n}: cancel of an unknown key returned true");
    assert!(h.engine.get(Q, "c").await.expect("get").is_none(), "{n}");
    h.at(T0 + 10_000).await;
    assert_eq!(h.recorder.keys(), ["keep"], "{n}: the cancelled timer fired");
}

/// Reschedule moves the due time both ways, keeps the payload, bumps the generation, and
/// reports an unknown key as not found.
pub async fn reschedule_moves_due_and_keeps_payload(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    let g1 = h.engine.schedule(spec("later", T0 + 1_000).with_payload(b"p".to_vec())).await.expect("schedule");
    let g2 = h.engine.reschedule(Q, "later", T0 + 5_000).await.expect("reschedule");
    assert!(g2 > g1, "{n}");
    h.engine.schedule(spec("sooner", T0 + 9_000)).await.expect("schedule");
    h.engine.reschedule(Q, "sooner", T0 + 2_000).await.expect("reschedule");
    h.at(T0 + 1_000).await;
    assert!(h.recorder.is_empty(), "{n}: fired at the old due time: {:?}", h.recorder.firings());
    h.at(T0 + 2_000).await;
    assert_eq!(h.recorder.keys(), ["sooner"], "{n}");
    h.at(T0 + 4_999).await;
    assert_eq!(h.recorder.len(), 1, "{n}");
    h.at(T0 + 5_000).await;
    let f = h.recorder.firings();
    assert_eq!(f.len(), 2, "{n}: {f:?}");
    assert_eq!((f[1].key.as_str(), f[1].payload.as_slice(), f[1].generation), ("later", &b"p"[..], g2), "{n}");
    let err = h.engine.reschedule(Q, "missing", T0 + 1).await.expect_err("unknown key");
    assert!(matches!(err, Error::NotFound { .. }), "{n}: {err:?}");
}

/// The store refuses to claim an old generation, a timer that is not due yet, or one already
/// claimed; and a settlement for an old generation changes nothing.
pub async fn stale_generation_is_never_claimed(b: &dyn Backend) {
    let n = b.name();
    let store = b.open().await.expect("open");
    let now = T0;
    let g = store.schedule(vec![spec("s", now)], now).await.expect("schedule");
    let old = TimerRef { queue: Q.into(), key: "s".into(), generation: g[0], due_at: now };
    let g2 = store.schedule(vec![spec("s", now).with_payload(b"new".to_vec())], now).await.expect("upsert");
    assert!(store.claim(std::slice::from_ref(&old), "node-a", now, now + 60_000).await.expect("claim").is_empty(),
        "{n}: an old generation was claimed");
    let cur = TimerRef { generation: g2[0], ..old.clone() };
    assert!(store.claim(std::slice::from_ref(&cur), "node-a", now - 1, now + 60_000).await.expect("claim").is_empty(),
        "{n}: a timer was claimed before its due time");
    let got = store.claim(std::slice::from_ref(&cur), "node-a", now, now + 60_000).await.expect("claim");
    assert_eq!(got.len(), 1, "{n}");
    assert_eq!(got[0].payload, b"new", "{n}");
    assert!(store.claim(std::slice::from_ref(&cur), "node-b", now + 1, now + 60_000).await.expect("claim").is_empty(),
        "{n}: a leased timer was claimed by another node");
    let t = store.get(Q, "s", now + 1).await.expect("get").expect("stored");
    assert!(matches!(t.state, TimerState::InFlight { .. }), "{n}: {:?}", t.state);
    // The lease expires: another node may take it.
    assert_eq!(store.claim(std::slice::from_ref(&cur), "node-b", now + 60_000, now + 120_000).await.expect("claim").len(), 1,
        "{n}: an expired lease was not claimable");
    // A settlement for the old generation is ignored.
    store.settle(vec![overdue_core::Settlement::Done(old)], now).await.expect("settle");
    assert!(store.get(Q, "s", now).await.expect("get").is_some(), "{n}: a stale Done deleted the current generation");
    store.settle(vec![overdue_core::Settlement::Done(cur)], now).await.expect("settle");
    assert!(store.get(Q, "s", now).await.expect("get").is_none(), "{n}");
}

/// A key cancelled and scheduled again gets a generation larger than any before it, so a firing
/// of the old life can never pass for the new one.
pub async fn generations_are_never_reused(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    let g1 = h.engine.schedule(spec("r", T0 + 1_000)).await.expect("schedule");
    h.engine.cancel(Q, "r").await.expect("cancel");
    let g2 = h.engine.schedule(spec("r", T0 + 1_000)).await.expect("schedule");
    assert!(g2 > g1, "{n}: generation reused after cancel: {g1} then {g2}");
    let other = h.engine.schedule(TimerSpec::new("other", "x", T0 + 1_000)).await.expect("schedule");
    assert!(other > g2, "{n}: generations are store-wide and increasing");
}

/// Timers fire in due-time order (one handler at a time, so start order is observable); with an
/// external trigger, all of them fire (brokers deliver in their own order).
pub async fn fires_in_due_order(b: &dyn Backend) {
    let n = b.name();
    let queue = QueueConfig { concurrency: 1, ..QueueConfig::default() };
    let h = Harness::start_with(b, queue, |_| Outcome::Done).await;
    // A fixed scramble of 200 distinct due times within 20 s.
    let dues: Vec<i64> = (0..200).map(|i| T0 + 1 + ((i * 7_919) % 200) * 100).collect();
    let specs: Vec<TimerSpec> = dues.iter().enumerate().map(|(i, d)| spec(&format!("k{i:03}"), *d)).collect();
    h.engine.schedule_batch(specs).await.expect("batch");
    h.at(T0 + 30_000).await;
    let fired: Vec<i64> = h.recorder.firings().iter().map(|f| f.due_at).collect();
    assert_eq!(fired.len(), 200, "{n}");
    // With an external trigger the order is the broker's delivery order: under a virtual clock
    // that jumps 30 s while the broker waits in real time, notices published after the jump are
    // all overdue at once and arrive in publication order (seen under load). Due order is the
    // in-process triggers' promise.
    if b.external().is_none() {
        assert!(fired.windows(2).all(|w| w[0] <= w[1]), "{n}: not in due order: {fired:?}");
    }
}

/// Payloads come back byte for byte: empty, every byte value, and the largest allowed.
pub async fn payload_round_trips(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    let all: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..64 * 1024).map(|i| (i * 31 % 251) as u8).collect();
    for (key, p) in [("empty", Vec::new()), ("bytes", all.clone()), ("big", big.clone())] {
        h.engine.schedule(spec(key, T0 + 10).with_payload(p)).await.expect("schedule");
    }
    assert_eq!(h.engine.get(Q, "big").await.expect("get").expect("stored").payload, big, "{n}");
    h.at(T0 + 10).await;
    let mut f = h.recorder.firings();
    f.sort_by(|a, b| a.key.cmp(&b.key));
    let got: Vec<(&str, &[u8])> = f.iter().map(|f| (f.key.as_str(), f.payload.as_slice())).collect();
    assert_eq!(got, vec![("big", big.as_slice()), ("bytes", all.as_slice()), ("empty", &[][..])], "{n}");
}

/// Failures back off exponentially (never sooner than the backoff), dead-letter after
/// `max_attempts`, are listed with their error, and replay puts them back.
pub async fn retry_backs_off_then_dead_letters_then_replays(b: &dyn Backend) {
    let n = b.name();
    let healthy = Arc::new(AtomicBool::new(false));
    let ok = healthy.clone();
    let queue = QueueConfig { max_attempts: 3, backoff_base: Duration::from_secs(1), ..no_jitter() };
    let h = Harness::start_with(b, queue, move |f| {
        if ok.load(Ordering::SeqCst) { Outcome::Done } else { Outcome::fail(format!("boom {}", f.attempt)) }
    })
    .await;
    h.engine.schedule(spec("f", T0 + 100).with_payload(b"keep".to_vec())).await.expect("schedule");
    h.at(T0 + 100).await;
    assert_eq!(h.recorder.len(), 1, "{n}");
    let t = h.engine.get(Q, "f").await.expect("get").expect("still stored after one failure");
    assert_eq!((t.attempts, t.last_error.as_deref(), t.due_at), (1, Some("boom 1"), T0 + 1_100), "{n}: {t:?}");
    h.at(T0 + 1_099).await;
    assert_eq!(h.recorder.len(), 1, "{n}: retried before the 1 s backoff");
    h.at(T0 + 1_100).await;
    assert_eq!(h.recorder.len(), 2, "{n}: no retry after 1 s");
    h.at(T0 + 3_099).await;
    assert_eq!(h.recorder.len(), 2, "{n}: second retry before the 2 s backoff");
    h.at(T0 + 3_100).await;
    let f = h.recorder.firings();
    assert_eq!(f.iter().map(|f| f.attempt).collect::<Vec<_>>(), [1, 2, 3], "{n}");
    assert!(h.engine.get(Q, "f").await.expect("get").is_none(), "{n}: a dead-lettered timer is still pending");
    let dead = h.engine.dead_letters(&DeadLetterQuery::default()).await.expect("list");
    assert_eq!(dead.len(), 1, "{n}: {dead:?}");
    assert_eq!((dead[0].key.as_str(), dead[0].attempts, dead[0].error.as_str(), dead[0].payload.as_slice()),
        ("f", 3, "boom 3", &b"keep"[..]), "{n}");
    let counts = h.engine.counts().await.expect("counts");
    assert_eq!(counts.iter().find(|c| c.queue == Q).map(|c| (c.pending, c.dead)), Some((0, 1)), "{n}: {counts:?}");
    let stats = h.engine.stats();
    assert_eq!((stats.retried, stats.dead_lettered, stats.handler_failures), (2, 1, 3), "{n}: {stats:?}");
    h.at(T0 + 100_000).await;
    assert_eq!(h.recorder.len(), 3, "{n}: a dead letter fired");
    healthy.store(true, Ordering::SeqCst);
    let err = h.engine.replay(dead[0].id + 1000).await.expect_err("unknown id");
    assert!(matches!(err, Error::DeadLetterNotFound(_)), "{n}: {err:?}");
    h.engine.replay(dead[0].id).await.expect("replay");
    h.engine.settle().await;
    let f = h.recorder.firings();
    assert_eq!(f.len(), 4, "{n}: replay did not fire");
    assert_eq!((f[3].attempt, f[3].payload.as_slice()), (1, &b"keep"[..]), "{n}");
    assert!(h.engine.dead_letters(&DeadLetterQuery::default()).await.expect("list").is_empty(), "{n}: replayed letter still listed");
}

/// `Outcome::Retry { after }` waits exactly `after`, not the backoff.
pub async fn explicit_retry_delay_is_honoured(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start_with(b, no_jitter(), |f| {
        if f.attempt == 1 { Outcome::Retry { after: Duration::from_secs(5), error: "later".into() } } else { Outcome::Done }
    })
    .await;
    h.engine.schedule(spec("r", T0)).await.expect("schedule");
    h.at(T0).await;
    h.at(T0 + 4_999).await;
    assert_eq!(h.recorder.len(), 1, "{n}: retried early");
    h.at(T0 + 5_000).await;
    assert_eq!(h.recorder.len(), 2, "{n}: not retried at +5 s");
    assert!(h.engine.get(Q, "r").await.expect("get").is_none(), "{n}");
}

/// A panicking handler is a failed attempt with the panic message as its error.
pub async fn panicking_handler_is_a_failure(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start_with(b, no_jitter(), |f| {
        if f.attempt == 1 { panic!("handler exploded") } else { Outcome::Done }
    })
    .await;
    h.engine.schedule(spec("p", T0)).await.expect("schedule");
    h.at(T0).await;
    let t = h.engine.get(Q, "p").await.expect("get").expect("kept for retry");
    assert_eq!(t.attempts, 1, "{n}");
    assert!(t.last_error.as_deref().unwrap_or("").contains("handler exploded"), "{n}: {:?}", t.last_error);
    h.at(T0 + 1_000).await;
    assert!(h.engine.get(Q, "p").await.expect("get").is_none(), "{n}: the retry did not complete it");
}

/// A timer whose queue has no handler is failed with an error naming the queue, and ends in the
/// dead-letter table rather than vanishing or spinning.
pub async fn unknown_queue_is_dead_lettered_with_a_clear_error(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    h.engine.schedule(TimerSpec::new("nobody.listens", "x", T0)).await.expect("schedule");
    // Default queue config: 5 attempts, backoff up to 10 min with jitter; an hour covers it.
    for step in 0..=60 {
        h.at(T0 + step * 60_000).await;
    }
    let dead = h.engine.dead_letters(&DeadLetterQuery { queue: Some("nobody.listens".into()), ..Default::default() }).await.expect("list");
    assert_eq!(dead.len(), 1, "{n}: {dead:?}");
    assert!(dead[0].error.contains("no handler registered for queue \"nobody.listens\""), "{n}: {}", dead[0].error);
}

/// Every kind of bad input is a typed error, and a batch with one bad timer stores nothing.
pub async fn bad_input_is_rejected_and_changes_nothing(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    let cases: Vec<(&str, TimerSpec)> = vec![
        ("empty queue", TimerSpec::new("", "k", T0)),
        ("long queue", TimerSpec::new("q".repeat(65), "k", T0)),
        ("queue with a space", TimerSpec::new("a b", "k", T0)),
        ("empty key", spec("", T0)),
        ("long key", spec(&"k".repeat(257), T0)),
        ("key with a newline", spec("a\nb", T0)),
        ("payload over 64 KiB", spec("k", T0).with_payload(vec![0; 64 * 1024 + 1])),
        ("due before the epoch", spec("k", -1)),
        ("due beyond the range", spec("k", T0 + MAX_DELAY_MS + 1)),
        ("due at i64::MAX", spec("k", i64::MAX)),
    ];
    for (what, bad) in cases {
        let err = h.engine.schedule(bad.clone()).await.expect_err(what);
        assert!(err.is_invalid_input(), "{n}: {what}: not an input error: {err:?}");
        let batch = vec![spec("good", T0 + 1), bad];
        let err = h.engine.schedule_batch(batch).await.expect_err(what);
        assert!(err.is_invalid_input(), "{n}: {what} in a batch: {err:?}");
    }
    let dup = h.engine.schedule_batch(vec![spec("d", T0), spec("d", T0 + 1)]).await.expect_err("duplicate");
    assert!(matches!(dup, Error::DuplicateInBatch { .. }), "{n}: {dup:?}");
    let big: Vec<TimerSpec> = (0..=MAX_BATCH).map(|i| spec(&i.to_string(), T0)).collect();
    assert!(matches!(h.engine.schedule_batch(big).await, Err(Error::BatchTooLarge { .. })), "{n}");
    assert!(h.engine.get("bad queue", "k").await.expect_err("bad queue").is_invalid_input(), "{n}");
    assert!(h.engine.cancel(Q, "").await.expect_err("empty key").is_invalid_input(), "{n}");
    assert!(h.engine.reschedule(Q, "k", -5).await.expect_err("bad due").is_invalid_input(), "{n}");
    let all = h.engine.list(&ListQuery::default()).await.expect("list");
    assert!(all.is_empty(), "{n}: bad input changed the store: {all:?}");
    assert!(h.engine.counts().await.expect("counts").iter().all(|c| c.pending == 0), "{n}");
    // 100 years ahead is inside the range.
    h.engine.schedule(spec("century", T0 + 100 * YEAR_MS)).await.expect("100 years ahead is supported");
}

/// A batch gets distinct increasing generations; list filters by queue and due range, pages with
/// the keyset cursor in due order; counts are per queue.
pub async fn batch_is_atomic_and_listable(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    let specs: Vec<TimerSpec> = (0..250).map(|i| spec(&format!("b{i:03}"), T0 + 60_000 + (i % 50) * 1_000)).collect();
    let gens = h.engine.schedule_batch(specs).await.expect("batch");
    assert_eq!(gens.len(), 250, "{n}");
    assert!(gens.windows(2).all(|w| w[0] < w[1]), "{n}: generations not increasing in input order");
    h.engine.schedule(TimerSpec::new("other", "o", T0 + 61_000)).await.expect("schedule");
    let mut seen = Vec::new();
    let mut q = ListQuery { queue: Some(Q.into()), limit: 40, ..Default::default() };
    loop {
        let page = h.engine.list(&q).await.expect("list");
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 40, "{n}");
        let last = page.last().map(|t| (t.due_at, t.queue.clone(), t.key.clone()));
        seen.extend(page);
        q.after = last;
    }
    assert_eq!(seen.len(), 250, "{n}: paging lost or repeated rows");
    assert!(seen.windows(2).all(|w| (w[0].due_at, &w[0].key) < (w[1].due_at, &w[1].key)), "{n}: not in (due, key) order");
    let ranged = h.engine.list(&ListQuery { due_from: Some(T0 + 61_000), due_to: Some(T0 + 62_000), limit: 1000, ..Default::default() })
        .await.expect("list");
    assert_eq!(ranged.len(), 11, "{n}: 5 + 5 of q and 1 of other expected in the range, got {}", ranged.len());
    let counts = h.engine.counts().await.expect("counts");
    let get = |q: &str| counts.iter().find(|c| c.queue == q).map(|c| c.pending);
    assert_eq!((get(Q), get("other")), (Some(250), Some(1)), "{n}: {counts:?}");
}

/// `due_histogram` puts every unclaimed timer in exactly one bucket by its distance from `now`,
/// per queue, and leaves claimed timers out.
pub async fn due_histogram_buckets_unclaimed_timers(b: &dyn Backend) {
    use overdue_core::DueBuckets;
    let n = b.name();
    let store = b.open().await.expect("open");
    let at = |key: &str, due: i64| spec(key, T0 + due);
    let g = store
        .schedule(
            vec![at("a", 30_000), at("b", 120_000), at("c", 7_200_000), at("d", 2 * 86_400_000), TimerSpec::new("other", "e", T0 + 10_000)],
            T0,
        )
        .await
        .expect("schedule");
    let buckets = |queue: &str, v: [u64; 5]| DueBuckets {
        queue: queue.into(), overdue: v[0], next_minute: v[1], next_hour: v[2], next_day: v[3], later: v[4],
    };
    let h = store.due_histogram(T0).await.expect("histogram");
    assert_eq!(h.queues, [buckets("other", [0, 1, 0, 0, 0]), buckets(Q, [0, 1, 1, 1, 1])], "{n}");
    assert!(h.exact, "{n}");
    // 45 s on: a is overdue, b (75 s ahead) is within the hour.
    let h = store.due_histogram(T0 + 45_000).await.expect("histogram");
    assert_eq!(h.queues, [buckets("other", [1, 0, 0, 0, 0]), buckets(Q, [1, 0, 1, 1, 1])], "{n}");
    // A claimed timer is in flight, not waiting: it leaves the histogram.
    let e = TimerRef { queue: "other".into(), key: "e".into(), generation: g[4], due_at: T0 + 10_000 };
    assert_eq!(store.claim(&[e], "node-a", T0 + 45_000, T0 + 3_600_000).await.expect("claim").len(), 1, "{n}");
    let h = store.due_histogram(T0 + 45_000).await.expect("histogram");
    assert_eq!(h.queues, [buckets(Q, [1, 0, 1, 1, 1])], "{n}: a queue with nothing waiting is left out");
}

/// Timers far beyond the in-memory horizon wait in the store and fire on time once it reaches
/// them; a timer a century away is stored and not fired.
pub async fn far_future_timers_wait_in_the_store(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    h.engine.schedule(spec("hour", T0 + 3_600_000)).await.expect("schedule");
    h.engine.schedule(spec("day", T0 + 86_400_000)).await.expect("schedule");
    h.engine.schedule(spec("century", T0 + 100 * YEAR_MS)).await.expect("schedule");
    h.at(T0 + 3_599_999).await;
    assert!(h.recorder.is_empty(), "{n}");
    h.at(T0 + 3_600_000).await;
    assert_eq!(h.recorder.keys(), ["hour"], "{n}");
    h.at(T0 + 86_400_000).await;
    assert_eq!(h.recorder.keys(), ["hour", "day"], "{n}");
    assert!(h.engine.get(Q, "century").await.expect("get").is_some(), "{n}");
}

/// `fire_now` makes a future timer due immediately.
pub async fn fire_now_fires_at_once(b: &dyn Backend) {
    let n = b.name();
    let h = Harness::start(b).await;
    h.engine.schedule(spec("soon", T0 + 3_600_000).with_payload(b"x".to_vec())).await.expect("schedule");
    h.engine.fire_now(Q, "soon").await.expect("fire now");
    h.engine.settle().await;
    let f = h.recorder.firings();
    assert_eq!(f.len(), 1, "{n}");
    assert_eq!(f[0].payload, b"x", "{n}");
}

/// After a crash (the engine dropped without shutdown, claims outstanding), a durable backend
/// fires every acknowledged timer exactly once after restart. Skipped for stores that do not
/// promise durability.
pub async fn restart_recovers_every_timer(b: &dyn Backend) {
    let n = b.name();
    let durable = b.open().await.expect("open").capabilities().durable;
    if !durable {
        return;
    }
    let clock = ManualClock::new(T0);
    {
        let h = Harness::start_at(b, clock.clone(), QueueConfig::default(), |_| Outcome::Done).await;
        let specs: Vec<TimerSpec> = (0..100).map(|i| spec(&format!("r{i:02}"), T0 + 1_000 + i * 1_000)).collect();
        h.engine.schedule_batch(specs).await.expect("batch");
        h.at(T0 + 10_000).await;
        assert_eq!(h.recorder.len(), 10, "{n}: before the crash");
        drop(h);
    }
    let h = Harness::start_at(b, clock.clone(), QueueConfig::default(), |_| Outcome::Done).await;
    h.at(T0 + 200_000).await;
    let mut keys = h.recorder.keys();
    keys.sort();
    let expected: Vec<String> = (10..100).map(|i| format!("r{i:02}")).collect();
    assert_eq!(keys, expected, "{n}: after restart exactly the unfired timers fire, once each");
}

/// Shutdown waits for running handlers within the grace period, then cancels the rest and
/// releases their claims: nothing is lost, and the timer fires again on the next start.
pub async fn shutdown_releases_in_flight_for_redelivery(b: &dyn Backend) {
    let n = b.name();
    let clock = ManualClock::new(T0);
    let store = b.open().await.expect("open");
    let durable = store.capabilities().durable;
    let started = Arc::new(tokio::sync::Notify::new());
    let s2 = started.clone();
    let engine = overdue_engine::Engine::builder(store.clone())
        .clock(Arc::new(clock.clone()))
        .config(overdue_engine::EngineConfig { trigger: b.trigger(), ..Default::default() })
        .handler(Q, QueueConfig::default(), move |_f: overdue_core::Firing| {
            let s = s2.clone();
            async move {
                s.notify_one();
                futures::future::pending::<()>().await;
                Outcome::Done
            }
        })
        .start()
        .await
        .expect("start");
    engine.schedule(spec("stuck", T0)).await.expect("schedule");
    {
        let settle = engine.settle();
        tokio::pin!(settle);
        tokio::select! {
            _ = started.notified() => {}
            _ = &mut settle => panic!("{n}: settle returned while a handler was still running"),
        }
    }
    let report = engine.shutdown(Duration::from_millis(50)).await;
    assert!(!report.drained, "{n}: {report:?}");
    assert_eq!(report.released, 1, "{n}: {report:?}");
    assert!(matches!(engine.schedule(spec("late", T0)).await, Err(Error::ShuttingDown)), "{n}");
    let t = store.get(Q, "stuck", T0).await.expect("get").expect("released, not lost");
    assert_eq!(t.state, TimerState::Pending, "{n}: the claim was not released");
    drop(engine);
    drop(store);
    if durable {
        let h = Harness::start_at(b, clock, QueueConfig::default(), |_| Outcome::Done).await;
        h.engine.settle().await;
        assert_eq!(h.recorder.keys(), ["stuck"], "{n}: the released timer did not fire after restart");
    }
}
