//! The SQLite store against the `Store` trait: generations, the claim contract, settlement,
//! dead letters, listing, counts, reopening, the process lock, group commit and `write()`.

use std::time::{Duration, Instant};

use overdue_core::{
    DeadLetterQuery, Error, ListQuery, QueueCount, Settlement, Store, TimerRef, TimerSpec, TimerState,
};
use overdue_sql::{Durability, SqlResultExt, SqliteOptions, SqliteStore};
use tempfile::TempDir;

const T0: i64 = 1_700_000_000_000;
const MIN: i64 = 60_000;

fn opts() -> SqliteOptions {
    // Tests do not need fsync; durability levels differ only in fsync (see crash_recovery.rs).
    SqliteOptions { durability: Durability::Normal, readers: 2, ..SqliteOptions::default() }
}

async fn open(dir: &TempDir) -> SqliteStore {
    SqliteStore::open(dir.path().join("overdue.db"), opts()).await.expect("open store")
}

fn spec(queue: &str, key: &str, due_at: i64) -> TimerSpec {
    TimerSpec::new(queue, key, due_at).with_payload(format!("{queue}/{key}").into_bytes())
}

fn tref(queue: &str, key: &str, generation: u64, due_at: i64) -> TimerRef {
    TimerRef { queue: queue.into(), key: key.into(), generation, due_at }
}

async fn one(store: &SqliteStore, s: TimerSpec, now: i64) -> TimerRef {
    let generation = store.schedule(vec![s.clone()], now).await.expect("schedule")[0];
    TimerRef { queue: s.queue, key: s.key, generation, due_at: s.due_at }
}

#[tokio::test]
async fn upsert_bumps_generation_replaces_payload_and_keeps_created_at() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let g1 = store.schedule(vec![spec("order.close", "o-1", T0 + MIN)], T0).await.expect("first")[0];
    let replacement = TimerSpec::new("order.close", "o-1", T0 + 2 * MIN).with_payload(b"v2".to_vec());
    let g2 = store.schedule(vec![replacement], T0 + 5).await.expect("second")[0];
    assert!(g2 > g1, "upsert must bump the generation: {g1} -> {g2}");

    let t = store.get("order.close", "o-1", T0 + 5).await.expect("get").expect("stored");
    assert_eq!((t.generation, t.due_at, t.payload.as_slice()), (g2, T0 + 2 * MIN, &b"v2"[..]));
    assert_eq!((t.created_at, t.updated_at), (T0, T0 + 5), "created_at survives an upsert");
    assert_eq!(t.state, TimerState::Pending);

    // A batch gets increasing generations in input order, all larger than before.
    let gens = store
        .schedule(vec![spec("q", "a", T0), spec("q", "b", T0), spec("q", "c", T0)], T0)
        .await
        .expect("batch");
    assert!(gens.windows(2).all(|w| w[0] < w[1]) && gens[0] > g2, "{gens:?}");
}

#[tokio::test]
async fn upsert_resets_attempts_error_and_lease() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("q", "k", T0), T0).await;
    store.claim(std::slice::from_ref(&r), "node-a", T0, T0 + MIN).await.expect("claim");
    let retry = Settlement::Retry { timer: r.clone(), due_at: T0 + 10, attempts: 3, error: "boom".into() };
    store.settle(vec![retry], T0).await.expect("retry");
    store.claim(&[tref("q", "k", r.generation, T0 + 10)], "node-a", T0 + 10, T0 + MIN).await.expect("claim");

    let g = store.schedule(vec![spec("q", "k", T0 + 20)], T0 + 11).await.expect("upsert")[0];
    let t = store.get("q", "k", T0 + 11).await.expect("get").expect("stored");
    assert_eq!((t.generation, t.attempts, t.last_error.as_deref()), (g, 0, None));
    assert_eq!(t.state, TimerState::Pending, "the old generation's lease must be gone");
}

#[tokio::test]
async fn generations_are_never_reused_after_cancel_or_reopen() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let g1 = one(&store, spec("q", "k", T0), T0).await.generation;
    assert_eq!(store.cancel("q", "k").await.expect("cancel"), Some(g1));
    assert_eq!(store.cancel("q", "k").await.expect("cancel again"), None);
    let g2 = one(&store, spec("q", "k", T0), T0).await.generation;
    assert!(g2 > g1, "{g1} then {g2}");
    assert_eq!(store.cancel("q", "k").await.expect("cancel"), Some(g2));
    drop(store);

    // The only row holding g2 is gone: the high-water mark in `meta` must remember it.
    let store = open(&dir).await;
    let g3 = one(&store, spec("q", "k", T0), T0).await.generation;
    assert!(g3 > g2, "after reopen {g3} must exceed {g2}");
}

#[tokio::test]
async fn reschedule_keeps_payload_and_drops_claim_and_attempts() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("q", "k", T0), T0).await;
    store.claim(std::slice::from_ref(&r), "node-a", T0, T0 + MIN).await.expect("claim");
    let g = store.reschedule("q", "k", T0 + 5 * MIN, T0 + 1).await.expect("reschedule").expect("exists");
    assert!(g > r.generation);
    let t = store.get("q", "k", T0 + 1).await.expect("get").expect("stored");
    assert_eq!((t.due_at, t.payload.as_slice(), t.generation), (T0 + 5 * MIN, &b"q/k"[..], g));
    assert_eq!((t.attempts, t.state), (0, TimerState::Pending));
    assert_eq!(store.reschedule("q", "missing", T0, T0).await.expect("reschedule"), None);
}

#[tokio::test]
async fn claim_requires_current_generation_due_time_and_free_lease() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("q", "k", T0 + 100), T0).await;

    let stale = tref("q", "k", r.generation - 1, r.due_at);
    assert!(
        store.claim(&[stale], "a", T0 + 100, T0 + MIN).await.expect("claim").is_empty(),
        "wrong generation"
    );
    assert!(
        store.claim(std::slice::from_ref(&r), "a", T0 + 99, T0 + MIN).await.expect("claim").is_empty(),
        "not yet due"
    );
    let missing = tref("q", "nope", r.generation, r.due_at);
    assert!(
        store.claim(&[missing], "a", T0 + 100, T0 + MIN).await.expect("claim").is_empty(),
        "no such timer"
    );

    let claimed = store.claim(std::slice::from_ref(&r), "a", T0 + 100, T0 + 1_000).await.expect("claim");
    assert_eq!(claimed.len(), 1);
    assert_eq!(
        (claimed[0].timer.clone(), claimed[0].payload.as_slice(), claimed[0].attempts),
        (r.clone(), &b"q/k"[..], 0)
    );
    let t = store.get("q", "k", T0 + 500).await.expect("get").expect("stored");
    assert_eq!(t.state, TimerState::InFlight { owner: "a".into(), lease_until: T0 + 1_000 });

    assert!(
        store.claim(std::slice::from_ref(&r), "b", T0 + 999, T0 + 2_000).await.expect("claim").is_empty(),
        "leased"
    );
    // At lease_until the lease has expired: another node takes over.
    let taken = store.claim(std::slice::from_ref(&r), "b", T0 + 1_000, T0 + 2_000).await.expect("claim");
    assert_eq!(taken.len(), 1, "an expired lease must be claimable");
    let t = store.get("q", "k", T0 + 1_000).await.expect("get").expect("stored");
    assert_eq!(t.state, TimerState::InFlight { owner: "b".into(), lease_until: T0 + 2_000 });
    assert_eq!(
        store.get("q", "k", T0 + 2_000).await.expect("get").expect("stored").state,
        TimerState::Pending
    );
}

#[tokio::test]
async fn claim_returns_claimed_timers_in_input_order_with_stored_due_time() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let a = one(&store, spec("q", "a", T0), T0).await;
    let b = one(&store, spec("q", "b", T0 - 5), T0).await;
    let c = one(&store, spec("q", "c", T0 + MIN), T0).await;
    // A ref with an outdated due time still claims (the generation is what matters) and
    // comes back with the stored due time.
    let b_old = TimerRef { due_at: T0 - 1_000, ..b.clone() };
    let claimed = store.claim(&[c, b_old, a.clone()], "n", T0, T0 + MIN).await.expect("claim");
    let got: Vec<_> = claimed.iter().map(|c| c.timer.clone()).collect();
    assert_eq!(got, vec![b, a]);
}

#[tokio::test]
async fn claim_due_takes_the_earliest_unclaimed_due_timers() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let specs = vec![
        spec("q", "late", T0 + MIN),
        spec("q", "b", T0 - 10),
        spec("p", "z", T0 - 10),
        spec("q", "a", T0 - 20),
        spec("q", "now", T0),
    ];
    store.schedule(specs, T0 - MIN).await.expect("schedule");
    let first = store.claim_due(T0, T0, 2, "n1", T0 + 1_000).await.expect("claim due");
    let keys: Vec<_> = first.iter().map(|c| (c.timer.queue.as_str(), c.timer.key.as_str())).collect();
    assert_eq!(keys, [("q", "a"), ("p", "z")], "(due_at, queue, key) order");
    let rest = store.claim_due(T0, T0, 10, "n2", T0 + 1_000).await.expect("claim due");
    let keys: Vec<_> = rest.iter().map(|c| c.timer.key.as_str()).collect();
    assert_eq!(keys, ["b", "now"], "leased timers are skipped; future ones are not due");
    // due_before bounds the scan; a due_before past `now` never claims early.
    assert!(store.claim_due(T0 + 1_000, T0 - 100, 10, "n3", T0 + 2_000).await.expect("claim due").is_empty());
    assert!(store.claim_due(T0, T0 + MIN, 10, "n3", T0 + 2_000).await.expect("claim due").is_empty());
    // After the leases expire everything due is claimable again.
    let again = store.claim_due(T0 + 1_000, T0 + 1_000, 10, "n3", T0 + 2_000).await.expect("claim due");
    assert_eq!(again.len(), 4);
}

#[tokio::test]
async fn settle_is_a_no_op_for_a_stale_generation() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let old = one(&store, spec("q", "k", T0), T0).await;
    store.claim(std::slice::from_ref(&old), "n", T0, T0 + MIN).await.expect("claim");
    let new = one(&store, spec("q", "k", T0 + MIN), T0 + 1).await;
    store
        .settle(
            vec![
                Settlement::Done(old.clone()),
                Settlement::Retry { timer: old.clone(), due_at: T0 + 5, attempts: 1, error: "x".into() },
                Settlement::DeadLetter { timer: old.clone(), attempts: 9, error: "x".into(), failed_at: T0 },
                Settlement::Release(old.clone()),
            ],
            T0 + 2,
        )
        .await
        .expect("settle");
    let t = store.get("q", "k", T0 + 2).await.expect("get").expect("the new generation stands");
    assert_eq!((t.generation, t.due_at, t.attempts), (new.generation, T0 + MIN, 0));
    assert!(store.dead_letters(&DeadLetterQuery::default()).await.expect("dead").is_empty());

    // The current generation settles.
    store.settle(vec![Settlement::Done(new)], T0 + 3).await.expect("settle");
    assert!(store.get("q", "k", T0 + 3).await.expect("get").is_none());
}

#[tokio::test]
async fn release_makes_a_claimed_timer_claimable_at_once() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("q", "k", T0), T0).await;
    store.claim(std::slice::from_ref(&r), "n", T0, T0 + MIN).await.expect("claim");
    store.settle(vec![Settlement::Release(r.clone())], T0 + 1).await.expect("release");
    let t = store.get("q", "k", T0 + 1).await.expect("get").expect("stored");
    assert_eq!((t.state, t.attempts), (TimerState::Pending, 0));
    assert_eq!(store.claim(&[r], "m", T0 + 1, T0 + MIN).await.expect("claim").len(), 1);
}

#[tokio::test]
async fn retry_dead_letter_and_replay_round_trip() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("order.close", "o-9", T0), T0).await;
    store.claim(std::slice::from_ref(&r), "n", T0, T0 + MIN).await.expect("claim");
    let retry =
        Settlement::Retry { timer: r.clone(), due_at: T0 + 1_000, attempts: 1, error: "db down".into() };
    store.settle(vec![retry], T0 + 10).await.expect("retry");

    let t = store.get("order.close", "o-9", T0 + 10).await.expect("get").expect("stored");
    assert_eq!((t.due_at, t.attempts, t.last_error.as_deref()), (T0 + 1_000, 1, Some("db down")));
    assert_eq!((t.state, t.generation, t.updated_at), (TimerState::Pending, r.generation, T0 + 10));
    assert!(store.claim_due(T0 + 999, T0 + 999, 10, "n", T0 + MIN).await.expect("claim").is_empty());
    let again = store.claim_due(T0 + 1_000, T0 + 1_000, 10, "n", T0 + MIN).await.expect("claim");
    assert_eq!((again.len(), again[0].attempts), (1, 1), "the retry is due again with its attempt count");

    let dl = Settlement::DeadLetter {
        timer: again[0].timer.clone(),
        attempts: 2,
        error: "gave up".into(),
        failed_at: T0 + 1_001,
    };
    store.settle(vec![dl], T0 + 1_001).await.expect("dead-letter");
    assert!(store.get("order.close", "o-9", T0 + 1_001).await.expect("get").is_none());
    let dead = store.dead_letters(&DeadLetterQuery::default()).await.expect("dead letters");
    assert_eq!(dead.len(), 1);
    let d = &dead[0];
    assert_eq!(
        (d.queue.as_str(), d.key.as_str(), d.generation, d.due_at),
        ("order.close", "o-9", r.generation, T0 + 1_000)
    );
    assert_eq!(
        (d.payload.as_slice(), d.attempts, d.error.as_str(), d.failed_at),
        (&b"order.close/o-9"[..], 2, "gave up", T0 + 1_001)
    );

    let g = store.replay(d.id, T0 + 5_000, T0 + 2_000).await.expect("replay").expect("exists");
    assert!(g > r.generation);
    assert!(store.dead_letters(&DeadLetterQuery::default()).await.expect("dead letters").is_empty());
    let t = store.get("order.close", "o-9", T0 + 2_000).await.expect("get").expect("replayed");
    assert_eq!((t.generation, t.due_at, t.attempts, t.last_error), (g, T0 + 5_000, 0, None));
    assert_eq!(t.payload, b"order.close/o-9");
    assert_eq!(store.replay(d.id, T0, T0).await.expect("replay"), None, "the dead letter is gone");
}

#[tokio::test]
async fn dead_letters_page_by_id_and_filter_by_queue() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let mut letters = Vec::new();
    for (i, queue) in ["a", "b", "a", "a", "b"].iter().enumerate() {
        let r = one(&store, spec(queue, &format!("k{i}"), T0), T0).await;
        letters.push(Settlement::DeadLetter { timer: r, attempts: 1, error: "e".into(), failed_at: T0 });
    }
    store.settle(letters, T0).await.expect("dead-letter");
    let page = store.dead_letters(&DeadLetterQuery { limit: 2, ..Default::default() }).await.expect("page");
    assert_eq!(page.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["k0", "k1"]);
    let next = store
        .dead_letters(&DeadLetterQuery { after_id: Some(page[1].id), limit: 2, ..Default::default() })
        .await
        .expect("page");
    assert_eq!(next.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["k2", "k3"]);
    let only_a = store
        .dead_letters(&DeadLetterQuery { queue: Some("a".into()), ..Default::default() })
        .await
        .expect("filter");
    assert_eq!(only_a.iter().map(|d| d.key.as_str()).collect::<Vec<_>>(), ["k0", "k2", "k3"]);
}

#[tokio::test]
async fn list_orders_pages_and_filters() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let mut specs = Vec::new();
    for i in 0..25_i64 {
        let queue = if i % 3 == 0 { "b.queue" } else { "a.queue" };
        // Ties on due_at are ordered by queue, then key.
        specs.push(spec(queue, &format!("key-{:02}", 24 - i), T0 + (i / 4) * MIN));
    }
    store.schedule(specs.clone(), T0).await.expect("schedule");
    let mut expected: Vec<(i64, String, String)> =
        specs.iter().map(|s| (s.due_at, s.queue.clone(), s.key.clone())).collect();
    expected.sort();

    let mut seen = Vec::new();
    let mut query = ListQuery { limit: 4, ..ListQuery::default() };
    loop {
        let page = store.list(&query, T0).await.expect("list");
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        query.after = Some((last.due_at, last.queue.clone(), last.key.clone()));
        seen.extend(page.into_iter().map(|t| (t.due_at, t.queue, t.key)));
    }
    assert_eq!(seen, expected, "keyset paging must visit every timer once, in order");

    let q = ListQuery {
        queue: Some("b.queue".into()),
        due_from: Some(T0 + MIN),
        due_to: Some(T0 + 4 * MIN),
        ..Default::default()
    };
    let got: Vec<_> =
        store.list(&q, T0).await.expect("list").into_iter().map(|t| (t.due_at, t.queue, t.key)).collect();
    let want: Vec<_> = expected
        .iter()
        .filter(|(due, queue, _)| queue == "b.queue" && (T0 + MIN..=T0 + 4 * MIN).contains(due))
        .cloned()
        .collect();
    assert!(!want.is_empty());
    assert_eq!(got, want);

    let default_page = store.list(&ListQuery::default(), T0).await.expect("list");
    assert_eq!(default_page.len(), 25, "limit 0 means the default page of 100");
}

#[tokio::test]
async fn list_reports_in_flight_timers() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("q", "k", T0), T0).await;
    store.claim(&[r], "node-7", T0, T0 + 500).await.expect("claim");
    let during = store.list(&ListQuery::default(), T0 + 499).await.expect("list");
    assert_eq!(during[0].state, TimerState::InFlight { owner: "node-7".into(), lease_until: T0 + 500 });
    let after = store.list(&ListQuery::default(), T0 + 500).await.expect("list");
    assert_eq!(after[0].state, TimerState::Pending);
}

#[tokio::test]
async fn due_refs_pages_the_near_future_including_claimed_timers() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let specs: Vec<_> = (0..10).map(|i| spec("q", &format!("k{i}"), T0 + i * 100)).collect();
    let gens = store.schedule(specs, T0).await.expect("schedule");
    store.claim(&[tref("q", "k0", gens[0], T0)], "n", T0, T0 + MIN).await.expect("claim");
    let first = store.due_refs(None, T0 + 450, 3).await.expect("refs");
    assert_eq!(
        first,
        vec![
            tref("q", "k0", gens[0], T0),
            tref("q", "k1", gens[1], T0 + 100),
            tref("q", "k2", gens[2], T0 + 200)
        ]
    );
    let cursor = (T0 + 200, "q".to_owned(), "k2".to_owned());
    let next = store.due_refs(Some(&cursor), T0 + 450, 3).await.expect("refs");
    assert_eq!(next.iter().map(|r| r.key.as_str()).collect::<Vec<_>>(), ["k3", "k4"], "bounded by until");
}

#[tokio::test]
async fn counts_per_queue_sorted_with_dead_only_queues() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    store
        .schedule(
            vec![spec("b", "1", T0), spec("b", "2", T0), spec("b", "3", T0 + MIN), spec("a", "1", T0)],
            T0,
        )
        .await
        .expect("schedule");
    let z = one(&store, spec("z", "1", T0), T0).await;
    store.claim_due(T0, T0, 1, "n", T0 + 100).await.expect("claim a/1");
    let claimed = store.claim_due(T0, T0, 1, "n", T0 + 100).await.expect("claim b/1");
    assert_eq!(claimed[0].timer.queue, "b");
    let dl = Settlement::DeadLetter { timer: z, attempts: 1, error: "e".into(), failed_at: T0 };
    store.settle(vec![dl], T0).await.expect("dead-letter");

    let c =
        |queue: &str, pending, in_flight, dead| QueueCount { queue: queue.into(), pending, in_flight, dead };
    assert_eq!(
        store.counts(T0 + 1).await.expect("counts"),
        vec![c("a", 0, 1, 0), c("b", 2, 1, 0), c("z", 0, 0, 1)]
    );
    assert_eq!(
        store.counts(T0 + 100).await.expect("counts"),
        vec![c("a", 1, 0, 0), c("b", 3, 0, 0), c("z", 0, 0, 1)],
        "expired leases count as pending"
    );
}

#[tokio::test]
async fn reopening_clears_leases_and_keeps_every_timer() {
    let dir = TempDir::new().expect("tempdir");
    let opts = SqliteOptions { durability: Durability::Full, ..opts() };
    let path = dir.path().join("nested/dir/overdue.db");
    let store = SqliteStore::open(&path, opts.clone()).await.expect("open creates parent dirs");
    let specs: Vec<_> = (0..1_000).map(|i| spec("q", &format!("k{i:04}"), T0 + i)).collect();
    store.schedule(specs, T0).await.expect("schedule");
    let claimed = store.claim_due(T0 + 10, T0 + 10, 5, "dead-node", T0 + 3_600_000).await.expect("claim");
    assert_eq!(claimed.len(), 5);
    drop(store);

    let store = SqliteStore::open(&path, opts).await.expect("reopen");
    let counts = store.counts(T0 + 10).await.expect("counts");
    assert_eq!(counts, vec![QueueCount { queue: "q".into(), pending: 1_000, in_flight: 0, dead: 0 }]);
    let again = store.claim_due(T0 + 10, T0 + 10, 100, "new-node", T0 + MIN).await.expect("claim");
    assert_eq!(again.len(), 11, "a restart re-fires the crashed claims at once");
    let t = store.get("q", "k0999", T0).await.expect("get").expect("durable");
    assert_eq!(t.payload, b"q/k0999");
}

/// Schema step 3 drops `timers_leased`: a database written before it loses the index at open,
/// and its claims are still cleared (by a scan of `timers`).
#[tokio::test]
async fn a_version_2_database_loses_its_lease_index_and_still_clears_leases() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("old.db");
    let store = SqliteStore::open(&path, opts()).await.expect("open");
    store.schedule((0..20).map(|i| spec("q", &format!("k{i:02}"), T0 + i)).collect(), T0).await.expect("schedule");
    assert_eq!(store.claim_due(T0 + 5, T0 + 5, 3, "dead-node", T0 + 3_600_000).await.expect("claim").len(), 3);
    let index_count = |store: SqliteStore| async move {
        store
            .write(|ctx| {
                ctx.connection()
                    .query_row("SELECT COUNT(*) FROM sqlite_master WHERE name = 'timers_leased'", [], |r| r.get::<_, i64>(0))
                    .store_err("test sql")
            })
            .await
            .expect("read schema")
    };
    assert_eq!(index_count(store.clone()).await, 0, "a new database has no lease index");
    // Back to what a build before step 3 left: the index, and version 2 recorded.
    store
        .write(|ctx| {
            ctx.connection()
                .execute_batch(
                    "CREATE INDEX timers_leased ON timers (lease_until) WHERE lease_until IS NOT NULL;
                     DELETE FROM overdue_schema WHERE version = 3;",
                )
                .store_err("test sql")
        })
        .await
        .expect("downgrade");
    assert_eq!(index_count(store.clone()).await, 1);
    drop(store);

    let store = SqliteStore::open(&path, opts()).await.expect("reopen migrates");
    assert_eq!(index_count(store.clone()).await, 0, "step 3 dropped the index");
    let counts = store.counts(T0 + 5).await.expect("counts");
    assert_eq!(counts, vec![QueueCount { queue: "q".into(), pending: 20, in_flight: 0, dead: 0 }], "leases cleared at open");
    let again = store.claim_due(T0 + 5, T0 + 5, 100, "new-node", T0 + MIN).await.expect("claim");
    assert_eq!(again.len(), 6, "the dead node's claims fire again at once");
}

#[tokio::test]
async fn a_second_open_fails_clearly_while_the_first_holds_the_lock() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("overdue.db");
    let first = SqliteStore::open(&path, opts()).await.expect("first open");
    let wait = Duration::from_millis(200);
    let started = Instant::now();
    let err = SqliteStore::open(&path, SqliteOptions { lock_timeout: wait, ..opts() })
        .await
        .expect_err("the database is locked");
    assert!(started.elapsed() >= wait, "must retry for the whole timeout, waited {:?}", started.elapsed());
    let msg = err.to_string();
    assert!(msg.contains("is in use by another overdue process"), "{msg}");
    assert!(msg.contains(&path.display().to_string()) && msg.contains(".lock"), "names the files: {msg}");
    assert!(msg.contains(&format!("pid {}", std::process::id())), "names the holder: {msg}");
    assert!(matches!(err, Error::Store { backend: "sqlite", transient: false, .. }));

    drop(first);
    let second = SqliteStore::open(&path, SqliteOptions { lock_timeout: wait, ..opts() }).await;
    assert!(second.is_ok(), "dropping the store releases the lock: {second:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_schedules_all_land_in_fewer_commits_than_messages() {
    let dir = TempDir::new().expect("tempdir");
    let store = SqliteStore::open(
        dir.path().join("overdue.db"),
        SqliteOptions { durability: Durability::Full, ..opts() },
    )
    .await
    .expect("open");
    const TASKS: usize = 64;
    const PER_TASK: usize = 50;
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let store = store.clone();
            tokio::spawn(async move {
                for i in 0..PER_TASK {
                    store.schedule(vec![spec("q", &format!("t{t}-{i}"), T0)], T0).await.expect("schedule");
                }
            })
        })
        .collect();
    for t in tasks {
        t.await.expect("task");
    }
    let counts = store.counts(T0).await.expect("counts");
    assert_eq!(counts[0].pending, (TASKS * PER_TASK) as u64);
    let stats = store.stats();
    assert_eq!(stats.messages, (TASKS * PER_TASK) as u64);
    assert!(stats.commits < stats.messages, "group commit must share transactions: {stats:?}");
    assert_eq!((stats.queued, stats.failed_commits, stats.rolled_back), (0, 0, 0), "{stats:?}");
}

/// Holds the writer thread inside a `write()` job until released, so that the test knows which
/// messages queue up behind it and land in the next group.
async fn block_writer(store: &SqliteStore) -> (std::sync::mpsc::Sender<()>, tokio::task::JoinHandle<()>) {
    let (release, gate) = std::sync::mpsc::channel::<()>();
    let (entered, is_in) = tokio::sync::oneshot::channel::<()>();
    let store = store.clone();
    let job = tokio::spawn(async move {
        store
            .write(move |_| {
                let _ = entered.send(());
                let _ = gate.recv();
                Ok(())
            })
            .await
            .expect("gate");
    });
    is_in.await.expect("the writer entered the gate job");
    (release, job)
}

async fn wait_until_queued(store: &SqliteStore, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.stats().queued < n {
        assert!(Instant::now() < deadline, "only {:?} queued", store.stats());
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_queued_during_a_commit_share_the_next_one() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let (release, gate) = block_writer(&store).await;
    const N: usize = 500;
    let tasks: Vec<_> = (0..N)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move { store.schedule(vec![spec("q", &format!("k{i}"), T0)], T0).await })
        })
        .collect();
    wait_until_queued(&store, N as u64).await;
    release.send(()).expect("release");
    gate.await.expect("gate");
    let mut generations = Vec::new();
    for t in tasks {
        generations.extend(t.await.expect("task").expect("schedule"));
    }
    generations.sort_unstable();
    generations.dedup();
    assert_eq!(generations.len(), N, "every schedule got its own generation");
    let stats = store.stats();
    assert_eq!(
        (stats.messages, stats.commits, stats.largest_batch),
        (N as u64 + 1, 2, N as u64),
        "{stats:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_write_rolls_back_only_itself() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    store
        .write(|ctx| {
            ctx.connection()
                .execute_batch("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
                .store_err("create orders")
        })
        .await
        .expect("create table");
    // Generations count up by one per timer written; the three writes below may reach the queue in
    // any order, so the skip is checked against this baseline, not against one write's number.
    let base = store.schedule(vec![spec("q", "before", T0)], T0).await.expect("schedule")[0];

    let (release, gate) = block_writer(&store).await;
    let good = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(|ctx| {
                    ctx.connection()
                        .execute("INSERT INTO orders VALUES ('o-1', 'pending_payment')", [])
                        .store_err("insert order")?;
                    ctx.schedule(&[spec("order.close", "o-1", T0 + 30 * MIN)], T0)
                })
                .await
        })
    };
    let bad = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(|ctx| -> overdue_core::Result<()> {
                    ctx.connection()
                        .execute("INSERT INTO orders VALUES ('o-2', 'pending_payment')", [])
                        .store_err("insert order")?;
                    ctx.schedule(&[spec("order.close", "o-2", T0 + 30 * MIN)], T0)?;
                    Err(Error::Config("out of stock".into()))
                })
                .await
        })
    };
    let panicky = {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write(|ctx| -> overdue_core::Result<()> {
                    ctx.connection()
                        .execute("INSERT INTO orders VALUES ('o-3', 'pending_payment')", [])
                        .store_err("insert order")?;
                    panic!("handler bug")
                })
                .await
        })
    };
    let also_good = {
        let store = store.clone();
        tokio::spawn(async move { store.schedule(vec![spec("order.remind", "o-1", T0)], T0).await })
    };
    wait_until_queued(&store, 4).await;
    release.send(()).expect("release");
    gate.await.expect("gate");

    let good = good.await.expect("task").expect("good write commits");
    let bad = bad.await.expect("task").expect_err("bad write fails");
    assert!(bad.to_string().contains("out of stock"), "{bad}");
    let panicked = panicky.await.expect("task").expect_err("a panic is an error, not a crash");
    assert!(panicked.to_string().contains("handler bug"), "{panicked}");
    let also_good = also_good.await.expect("task").expect("store write commits");
    let stats = store.stats();
    assert_eq!((stats.rolled_back, stats.failed_commits), (2, 0), "{stats:?}");
    assert!(stats.largest_batch >= 4, "all four shared one group: {stats:?}");

    let orders: Vec<String> = store
        .write(|ctx| {
            let mut stmt =
                ctx.connection().prepare("SELECT id FROM orders ORDER BY id").store_err("select")?;
            let rows = stmt.query_map([], |r| r.get(0)).store_err("select")?;
            rows.collect::<rusqlite::Result<Vec<String>>>().store_err("select")
        })
        .await
        .expect("read orders");
    assert_eq!(orders, ["o-1"]);
    let t = store.get("order.close", "o-1", T0).await.expect("get").expect("scheduled with its order");
    assert_eq!(t.generation, good[0]);
    assert!(store.get("order.close", "o-2", T0).await.expect("get").is_none(), "rolled back with its order");
    assert!(store.get("order.remind", "o-1", T0).await.expect("get").is_some());

    // The group handed out three generations (good, bad, also_good); the rolled-back one is
    // skipped, never handed out again.
    let handed = [good[0], also_good[0]];
    assert!(handed.iter().all(|g| (base + 1..=base + 3).contains(g)), "{handed:?} after {base}");
    let next = store.schedule(vec![spec("q", "after", T0)], T0).await.expect("schedule")[0];
    assert_eq!(next, base + 4, "the rolled-back write's generation must not be reused");
}

/// `write_without_savepoint`: a closure refused before its first change fails alone; one that
/// fails after changing rows takes its whole group down with it (nothing half-done commits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_without_a_savepoint_fail_alone_only_before_their_first_change() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    store
        .write(|ctx| {
            ctx.connection()
                .execute_batch("CREATE TABLE orders (id TEXT PRIMARY KEY, status TEXT NOT NULL)")
                .store_err("create orders")
        })
        .await
        .expect("create table");
    let insert = |store: &SqliteStore, id: &'static str, fail: Option<bool>| {
        let store = store.clone();
        tokio::spawn(async move {
            store
                .write_without_savepoint(move |ctx| -> overdue_core::Result<()> {
                    if fail == Some(false) {
                        return Err(Error::Config("refused before writing".into()));
                    }
                    ctx.connection()
                        .execute("INSERT INTO orders VALUES (?1, 'pending_payment')", [id])
                        .store_err("insert order")?;
                    ctx.schedule_or_fail(&[spec("order.close", id, T0 + 30 * MIN)], T0)?;
                    if fail == Some(true) {
                        return Err(Error::Config("failed after writing".into()));
                    }
                    Ok(())
                })
                .await
        })
    };

    // Refused before its first change: the rest of its group commits.
    let (release, gate) = block_writer(&store).await;
    let good = insert(&store, "o-1", None);
    let refused = insert(&store, "o-2", Some(false));
    wait_until_queued(&store, 2).await;
    release.send(()).expect("release");
    gate.await.expect("gate");
    good.await.expect("task").expect("good write commits");
    let e = refused.await.expect("task").expect_err("refused");
    assert!(e.to_string().contains("refused before writing"), "{e}");
    assert!(store.get("order.close", "o-1", T0).await.expect("get").is_some());
    assert_eq!(store.stats().failed_commits, 0);

    // Failed after changing rows: the whole group is rolled back, every write of it fails.
    let (release, gate) = block_writer(&store).await;
    let innocent = insert(&store, "o-3", None);
    let broken = insert(&store, "o-4", Some(true));
    wait_until_queued(&store, 2).await;
    release.send(()).expect("release");
    gate.await.expect("gate");
    let e = broken.await.expect("task").expect_err("broken");
    assert!(e.to_string().contains("failed after writing"), "its own error: {e}");
    let e = innocent.await.expect("task").expect_err("the group was rolled back");
    assert!(e.to_string().contains("without a savepoint"), "{e}");
    for id in ["o-3", "o-4"] {
        assert!(store.get("order.close", id, T0).await.expect("get").is_none(), "{id} rolled back");
    }
    let orders: Vec<String> = store
        .write(|ctx| {
            let mut stmt = ctx.connection().prepare("SELECT id FROM orders ORDER BY id").store_err("select")?;
            let rows = stmt.query_map([], |r| r.get(0)).store_err("select")?;
            rows.collect::<rusqlite::Result<Vec<String>>>().store_err("select")
        })
        .await
        .expect("read orders");
    assert_eq!(orders, ["o-1"]);
}

#[tokio::test]
async fn write_ctx_cancel_and_reschedule_share_the_store_semantics() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("order.close", "o-1", T0 + MIN), T0).await;
    let (cancelled, moved) = store
        .write(|ctx| {
            let c = ctx.cancel("order.close", "o-1")?;
            ctx.schedule(&[spec("order.auto_confirm", "o-1", T0 + 7 * MIN)], T0)?;
            let m = ctx.reschedule("order.auto_confirm", "o-1", T0 + 8 * MIN, T0)?;
            Ok((c, m))
        })
        .await
        .expect("write");
    assert_eq!(cancelled, Some(r.generation));
    let t = store.get("order.auto_confirm", "o-1", T0).await.expect("get").expect("stored");
    assert_eq!((Some(t.generation), t.due_at), (moved, T0 + 8 * MIN));
    assert!(store.get("order.close", "o-1", T0).await.expect("get").is_none());
}

#[tokio::test]
async fn write_ctx_remove_deletes_whatever_generation_is_stored() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    let r = one(&store, spec("order.close", "o-1", T0 + 5), T0).await;
    // Claimed or not, the timer goes; a second remove finds nothing.
    assert_eq!(store.claim(std::slice::from_ref(&r), "n", T0 + 5, T0 + MIN).await.expect("claim").len(), 1);
    let removed = store
        .write(|ctx| Ok((ctx.remove("order.close", "o-1")?, ctx.remove("order.close", "o-1")?, ctx.remove("order.close", "o-2")?)))
        .await
        .expect("write");
    assert_eq!(removed, (true, false, false));
    assert!(store.get("order.close", "o-1", T0).await.expect("get").is_none());
    // The claim's settlement afterwards changes nothing.
    store.settle(vec![Settlement::Done(r)], T0 + 6).await.expect("settle");
    assert!(store.counts(T0 + 6).await.expect("counts").is_empty());
}

#[tokio::test]
async fn a_database_from_a_newer_build_is_refused() {
    let dir = TempDir::new().expect("tempdir");
    let store = open(&dir).await;
    store
        .write(|ctx| {
            ctx.connection()
                .execute("INSERT INTO overdue_schema (version, name) VALUES (999, 'from the future')", [])
                .store_err("insert")
        })
        .await
        .expect("write");
    drop(store);
    let err = SqliteStore::open(dir.path().join("overdue.db"), opts()).await.expect_err("newer schema");
    assert!(err.to_string().contains("schema version 999, newer than"), "{err}");
}

#[tokio::test]
async fn bad_urls_and_paths_fail_clearly() {
    for url in ["postgres://localhost/overdue", "overdue.db", "sqlite::memory:"] {
        let err = SqliteStore::open_url(url).await.expect_err(url);
        assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
    }
    let dir = TempDir::new().expect("tempdir");
    let err = SqliteStore::open(dir.path(), opts()).await.expect_err("a directory");
    assert!(err.to_string().contains("is a directory"), "{err}");

    let url = format!("sqlite://{}?durability=buffer", dir.path().join("u.db").display());
    let store = SqliteStore::open_url(&url).await.expect("url open");
    assert_eq!(store.options().durability, Durability::Buffer);
    assert_eq!(store.capabilities().name, "sqlite");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_last_handle_on_the_writer_thread_does_not_hang() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("overdue.db");
    let store = SqliteStore::open(&path, opts()).await.expect("open");
    let last = store.clone();
    let (go, wait) = std::sync::mpsc::channel::<()>();
    {
        let mut write = Box::pin(store.write(move |_| {
            let _ = wait.recv();
            // By now every other handle is gone: this drop runs the store's Drop on the
            // writer thread itself.
            drop(last);
            Ok(())
        }));
        assert!(futures::poll!(&mut write).is_pending(), "the write is queued");
    }
    drop(store);
    go.send(()).expect("the closure is waiting");
    let reopened =
        SqliteStore::open(&path, SqliteOptions { lock_timeout: Duration::from_secs(5), ..opts() }).await;
    assert!(reopened.is_ok(), "the writer thread exited and released the lock: {reopened:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_write_lock_fails_the_group_with_a_transient_error() {
    let dir = TempDir::new().expect("tempdir");
    let path = dir.path().join("overdue.db");
    let opts = SqliteOptions { busy_timeout: Duration::from_millis(100), ..opts() };
    let store = SqliteStore::open(&path, opts).await.expect("open");
    let before = one(&store, spec("q", "before", T0), T0).await.generation;

    // A stand-in for the sqlite3 shell holding the write lock.
    let foreign = rusqlite::Connection::open(&path).expect("foreign connection");
    foreign.execute_batch("BEGIN IMMEDIATE").expect("take the write lock");
    let err = store.schedule(vec![spec("q", "k", T0)], T0).await.expect_err("the database is locked");
    assert!(err.is_transient(), "busy must be retryable: {err}");
    assert!(matches!(err, Error::Store { backend: "sqlite", .. }), "{err:?}");
    assert_eq!(store.stats().failed_commits, 1);
    // Reads are not blocked by a writer.
    assert!(store.get("q", "before", T0).await.expect("get").is_some());

    foreign.execute_batch("ROLLBACK").expect("release");
    let after = one(&store, spec("q", "k", T0), T0).await.generation;
    assert!(after > before, "{before} then {after}");
    assert!(store.get("q", "k", T0).await.expect("get").is_some());
}
