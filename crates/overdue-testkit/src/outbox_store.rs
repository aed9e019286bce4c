//! The outbox at the [`Store`] level, one body per case for the PostgreSQL and MySQL stores'
//! `tests/outbox.rs` (each passes a fresh store opened with `outbox=true`): every write that gives
//! a timer a new generation or a new due time records a notice; `outbox_fetch` reads them oldest
//! first; `outbox_ack` deletes exactly the given rows. What needs the store's own SQL (its
//! transactions, row locks, schema versions) stays in those files.

use overdue_core::{DeadLetterQuery, Settlement, Store, TimerRef, TimerSpec};

const NOW: i64 = 1_700_000_000_000;

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec::new("q", key, due_at).with_payload(key.as_bytes().to_vec())
}

fn notice(key: &str, generation: u64, due_at: i64) -> TimerRef {
    TimerRef { queue: "q".into(), key: key.into(), generation, due_at }
}

async fn notices(s: &dyn Store) -> Vec<TimerRef> {
    s.outbox_fetch(10_000).await.expect("fetch").into_iter().map(|(_, n)| n).collect()
}

async fn ack_all(s: &dyn Store) {
    let seqs: Vec<i64> = s.outbox_fetch(10_000).await.expect("fetch").iter().map(|(q, _)| *q).collect();
    s.outbox_ack(&seqs).await.expect("ack");
}

/// An upsert writes one notice per new generation; a replacement adds one; a cancel none.
pub async fn an_upsert_writes_one_notice_per_new_generation(s: &dyn Store) {
    let gens = s.schedule(vec![spec("b", NOW + 2), spec("a", NOW + 1), spec("c", NOW + 3)], NOW).await.expect("schedule");
    let mut got = notices(s).await;
    got.sort_by(|x, y| x.key.cmp(&y.key));
    assert_eq!(got, vec![notice("a", gens[1], NOW + 1), notice("b", gens[0], NOW + 2), notice("c", gens[2], NOW + 3)]);
    // Replacing a timer is a new generation: one more notice, the old one stays (stale, fenced).
    let g = s.schedule(vec![spec("a", NOW + 10)], NOW).await.expect("replace")[0];
    assert!(g > gens[1]);
    let got = notices(s).await;
    assert_eq!(got.len(), 4);
    assert_eq!(got.last(), Some(&notice("a", g, NOW + 10)), "newest last");
    // Cancelling writes nothing.
    assert_eq!(s.cancel("q", "b").await.expect("cancel"), Some(gens[0]));
    assert_eq!(notices(s).await.len(), 4);
}

/// Fetch is oldest first and honours its limit; ack deletes only the rows named (unknown ones
/// and a second ack are harmless); sequence numbers are never reused.
pub async fn fetch_is_oldest_first_and_ack_deletes_only_those_rows(s: &dyn Store) {
    let mut gens = Vec::new();
    for i in 0..5 {
        gens.push(s.schedule(vec![spec(&format!("k{i}"), NOW + i)], NOW).await.expect("schedule")[0]);
    }
    let first = s.outbox_fetch(2).await.expect("fetch");
    assert_eq!(first.len(), 2, "limit");
    assert_eq!(first[0].1, notice("k0", gens[0], NOW));
    assert_eq!(first[1].1, notice("k1", gens[1], NOW + 1));
    let all = s.outbox_fetch(100).await.expect("fetch");
    let seqs: Vec<i64> = all.iter().map(|(seq, _)| *seq).collect();
    assert!(seqs.windows(2).all(|w| w[0] < w[1]), "ascending: {seqs:?}");
    assert_eq!(all.iter().map(|(_, n)| n.key.as_str()).collect::<Vec<_>>(), ["k0", "k1", "k2", "k3", "k4"]);
    // Ack two of them and an unknown sequence number (another relay got there first).
    s.outbox_ack(&[seqs[0], seqs[2], i64::MAX]).await.expect("ack");
    let left: Vec<i64> = s.outbox_fetch(100).await.expect("fetch").iter().map(|(seq, _)| *seq).collect();
    assert_eq!(left, vec![seqs[1], seqs[3], seqs[4]]);
    s.outbox_ack(&[]).await.expect("empty ack");
    s.outbox_ack(&left).await.expect("ack the rest");
    s.outbox_ack(&left).await.expect("acking twice is harmless");
    assert!(s.outbox_fetch(100).await.expect("fetch").is_empty());
    // Sequence numbers are never reused, even once the table is empty.
    s.schedule(vec![spec("later", NOW)], NOW).await.expect("schedule");
    let next = s.outbox_fetch(1).await.expect("fetch")[0].0;
    assert!(next > seqs[4], "{next} reuses a sequence number <= {}", seqs[4]);
}

/// Reschedule, retry and replay write a notice; a stale settlement, done and dead-lettering do not.
pub async fn reschedule_retry_and_replay_write_notices(s: &dyn Store) {
    let g0 = s.schedule(vec![spec("t", NOW), spec("d", NOW)], NOW).await.expect("schedule");
    ack_all(s).await;

    // Reschedule: a new generation at the new due time; of a missing timer: nothing.
    let g1 = s.reschedule("q", "t", NOW + 100, NOW).await.expect("reschedule").expect("exists");
    assert!(s.reschedule("q", "missing", NOW, NOW).await.expect("reschedule").is_none());
    assert_eq!(notices(s).await, vec![notice("t", g1, NOW + 100)]);
    ack_all(s).await;

    // Retry: the same generation at its new due time; a stale settlement writes nothing.
    let t = notice("t", g1, NOW + 100);
    let claimed = s.claim(std::slice::from_ref(&t), "me", NOW + 100, NOW + 10_000).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    let stale = notice("t", g0[0], NOW);
    s.settle(
        vec![
            Settlement::Retry { timer: t.clone(), due_at: NOW + 500, attempts: 1, error: "busy".into() },
            Settlement::Retry { timer: stale, due_at: NOW + 900, attempts: 1, error: "stale".into() },
        ],
        NOW + 100,
    )
    .await
    .expect("settle");
    assert_eq!(notices(s).await, vec![notice("t", g1, NOW + 500)]);
    ack_all(s).await;

    // Done, release and dead-lettering write nothing; replaying a dead letter does.
    let d = notice("d", g0[1], NOW);
    s.claim(std::slice::from_ref(&d), "me", NOW, NOW + 10_000).await.expect("claim");
    s.settle(vec![Settlement::DeadLetter { timer: d, attempts: 3, error: "boom".into(), failed_at: NOW }], NOW)
        .await
        .expect("dead letter");
    assert!(notices(s).await.is_empty(), "dead-lettering wrote a notice");
    let id = s.dead_letters(&DeadLetterQuery::default()).await.expect("dead letters")[0].id;
    let g2 = s.replay(id, NOW + 50, NOW).await.expect("replay").expect("replayed");
    assert!(s.replay(id, NOW + 50, NOW).await.expect("replay").is_none(), "gone");
    assert_eq!(notices(s).await, vec![notice("d", g2, NOW + 50)]);
}
