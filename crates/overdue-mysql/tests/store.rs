//! MySQL-specific behaviour the shared suite does not reach: bytewise identities (no padding),
//! statement chunking, generations shared by concurrent nodes, disjoint concurrent scans,
//! generation-fenced batched settlements and the `max_allowed_packet` bound.

mod common;

use std::collections::BTreeSet;

use overdue_core::{ListQuery, Settlement, Store, TimerRef, TimerSpec};
use overdue_mysql::MysqlStore;

async fn store(extra: &str) -> Option<MysqlStore> {
    let url = common::fresh_url(extra).await?;
    Some(MysqlStore::open_url(&url).await.expect("open"))
}

const NOW: i64 = 1_700_000_000_000;

fn r(queue: &str, key: &str, generation: u64, due_at: i64) -> TimerRef {
    TimerRef {
        queue: queue.into(),
        key: key.into(),
        generation,
        due_at,
    }
}

#[tokio::test]
async fn keys_are_bytewise_distinct_and_ordered() {
    let Some(s) = store("").await else { return };
    // Under MariaDB's PAD SPACE utf8mb4_bin "a" and "a " would be one primary key.
    let keys = ["a", "a ", "A", "b", "ä", "é", "z", "ключ", "🙂"];
    let specs = keys
        .iter()
        .map(|k| TimerSpec::new("q", *k, NOW).with_payload(k.as_bytes().to_vec()))
        .collect();
    let gens = s.schedule(specs, NOW).await.expect("schedule");
    assert_eq!(gens.len(), keys.len());
    assert_eq!(
        gens.iter().collect::<BTreeSet<_>>().len(),
        keys.len(),
        "distinct generations"
    );
    let listed = s.list(&ListQuery::default(), NOW).await.expect("list");
    let got: Vec<&str> = listed.iter().map(|t| t.key.as_str()).collect();
    let mut want = keys.to_vec();
    want.sort_unstable(); // Rust's byte order, as the engine's index
    assert_eq!(got, want);
    for t in &listed {
        assert_eq!(t.payload, t.key.as_bytes(), "payload of {:?}", t.key);
    }
    // Keyset paging one row at a time visits the same order.
    let mut after = None;
    let mut paged = Vec::new();
    loop {
        let q = ListQuery {
            after: after.clone(),
            limit: 1,
            ..ListQuery::default()
        };
        let page = s.list(&q, NOW).await.expect("page");
        let Some(t) = page.first() else { break };
        after = Some((t.due_at, t.queue.clone(), t.key.clone()));
        paged.push(t.key.clone());
    }
    assert_eq!(paged, want);
    assert_eq!(s.cancel("q", "a ").await.expect("cancel"), Some(gens[1]));
    assert!(
        s.get("q", "a", NOW).await.expect("get").is_some(),
        "cancelling \"a \" leaves \"a\""
    );
}

#[tokio::test]
async fn a_batch_past_the_placeholder_limit_is_one_atomic_schedule() {
    let Some(s) = store("").await else { return };
    // 10,000 rows x 8 placeholders = 80,000 > 65,535: two statements in one transaction.
    let specs: Vec<TimerSpec> = (0..10_000)
        .map(|i| TimerSpec::new("bulk", format!("k{i:05}"), NOW + i))
        .collect();
    let gens = s.schedule(specs, NOW).await.expect("schedule");
    assert!(
        gens.windows(2).all(|w| w[1] == w[0] + 1),
        "one reserved block, in input order"
    );
    let counts = s.counts(NOW).await.expect("counts");
    assert_eq!(counts.iter().map(|c| c.pending).sum::<u64>(), 10_000);
    let t = s
        .get("bulk", "k09999", NOW)
        .await
        .expect("get")
        .expect("stored");
    assert_eq!((t.generation, t.due_at), (gens[9_999], NOW + 9_999));
    let refs = s
        .due_refs(None, NOW + 20_000, 20_000)
        .await
        .expect("due_refs");
    assert_eq!(refs.len(), 10_000);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_nodes_never_share_a_generation_or_a_claim() {
    let Some(url) = common::fresh_url("pool=4").await else {
        return;
    };
    let a = MysqlStore::open_url(&format!("{url}&node=a"))
        .await
        .expect("open a");
    let b = MysqlStore::open_url(&format!("{url}&node=b"))
        .await
        .expect("open b");
    let batch = |node: &str, round: usize| -> Vec<TimerSpec> {
        (0..50)
            .map(|i| TimerSpec::new("race", format!("{node}-{round}-{i}"), NOW - 1))
            .collect()
    };
    let (ga, gb) = tokio::join!(
        async {
            let mut g = Vec::new();
            for round in 0..10 {
                g.extend(
                    a.schedule(batch("a", round), NOW)
                        .await
                        .expect("schedule a"),
                );
            }
            g
        },
        async {
            let mut g = Vec::new();
            for round in 0..10 {
                g.extend(
                    b.schedule(batch("b", round), NOW)
                        .await
                        .expect("schedule b"),
                );
            }
            g
        }
    );
    let all: BTreeSet<u64> = ga.iter().chain(&gb).copied().collect();
    assert_eq!(all.len(), 1_000, "every generation handed out once");

    // Two scanners at once: FOR UPDATE SKIP LOCKED gives them disjoint rows, together all.
    let (ca, cb) = tokio::join!(
        async {
            let mut got = Vec::new();
            loop {
                let c = a
                    .claim_due(NOW, NOW, 37, "a", NOW + 60_000)
                    .await
                    .expect("claim a");
                if c.is_empty() {
                    return got;
                }
                got.extend(c.into_iter().map(|c| c.timer.key));
            }
        },
        async {
            let mut got = Vec::new();
            loop {
                let c = b
                    .claim_due(NOW, NOW, 41, "b", NOW + 60_000)
                    .await
                    .expect("claim b");
                if c.is_empty() {
                    return got;
                }
                got.extend(c.into_iter().map(|c| c.timer.key));
            }
        }
    );
    let sa: BTreeSet<&String> = ca.iter().collect();
    let sb: BTreeSet<&String> = cb.iter().collect();
    assert_eq!(
        sa.len() + sb.len(),
        1_000,
        "a {} + b {}",
        sa.len(),
        sb.len()
    );
    assert!(sa.is_disjoint(&sb), "a row claimed by both scanners");
    // Claimed rows are leased: neither claim nor scan takes them again before the lease ends.
    let again = a
        .claim_due(NOW + 1, NOW, 1_000, "a", NOW + 60_000)
        .await
        .expect("claim again");
    assert!(again.is_empty());
}

#[tokio::test]
async fn settlements_are_batched_and_generation_fenced() {
    let Some(s) = store("").await else { return };
    let specs = ["done", "retry", "dead", "release", "stale"]
        .iter()
        .map(|k| TimerSpec::new("q", *k, NOW - 10))
        .collect();
    let g = s.schedule(specs, NOW).await.expect("schedule");
    let refs: Vec<TimerRef> = ["done", "retry", "dead", "release", "stale"]
        .iter()
        .zip(&g)
        .map(|(k, g)| r("q", k, *g, NOW - 10))
        .collect();
    // Claims come back in input order, whatever order the rows were locked in.
    let reversed: Vec<TimerRef> = refs.iter().rev().cloned().collect();
    let claimed = s
        .claim(&reversed, "me", NOW, NOW + 60_000)
        .await
        .expect("claim");
    let keys: Vec<&str> = claimed.iter().map(|c| c.timer.key.as_str()).collect();
    assert_eq!(keys, ["stale", "release", "dead", "retry", "done"]);
    // A claim of a wrong generation or of a leased row takes nothing.
    assert!(
        s.claim(&[r("q", "done", g[0] + 100, 0)], "x", NOW, NOW + 1)
            .await
            .expect("claim")
            .is_empty()
    );
    assert!(
        s.claim(&refs[..1], "x", NOW, NOW + 1)
            .await
            .expect("claim")
            .is_empty(),
        "leased"
    );
    // "stale" is replaced before its settlement arrives.
    let g_stale = s
        .schedule(vec![TimerSpec::new("q", "stale", NOW + 5_000)], NOW)
        .await
        .expect("replace")[0];
    s.settle(
        vec![
            Settlement::Done(refs[0].clone()),
            Settlement::Retry {
                timer: refs[1].clone(),
                due_at: NOW + 1_000,
                attempts: 1,
                error: "boom".into(),
            },
            Settlement::DeadLetter {
                timer: refs[2].clone(),
                attempts: 3,
                error: "gave up".into(),
                failed_at: NOW,
            },
            Settlement::Release(refs[3].clone()),
            Settlement::DeadLetter {
                timer: refs[4].clone(),
                attempts: 9,
                error: "stale".into(),
                failed_at: NOW,
            },
        ],
        NOW,
    )
    .await
    .expect("settle");
    assert!(s.get("q", "done", NOW).await.expect("get").is_none());
    let retry = s.get("q", "retry", NOW).await.expect("get").expect("kept");
    assert_eq!(
        (retry.due_at, retry.attempts, retry.last_error.as_deref()),
        (NOW + 1_000, 1, Some("boom"))
    );
    assert_eq!(retry.state, overdue_core::TimerState::Pending);
    assert!(s.get("q", "dead", NOW).await.expect("get").is_none());
    let release = s
        .get("q", "release", NOW)
        .await
        .expect("get")
        .expect("kept");
    assert_eq!(release.state, overdue_core::TimerState::Pending);
    let stale = s
        .get("q", "stale", NOW)
        .await
        .expect("get")
        .expect("the replacement survives");
    assert_eq!((stale.generation, stale.due_at), (g_stale, NOW + 5_000));
    let dead = s
        .dead_letters(&Default::default())
        .await
        .expect("dead letters");
    assert_eq!(
        dead.len(),
        1,
        "only the current generation is dead-lettered: {dead:?}"
    );
    assert_eq!(
        (
            dead[0].key.as_str(),
            dead[0].attempts,
            dead[0].error.as_str()
        ),
        ("dead", 3, "gave up")
    );
    let replayed = s
        .replay(dead[0].id, NOW + 7, NOW)
        .await
        .expect("replay")
        .expect("found");
    assert!(replayed > g_stale, "a replay gets a fresh generation");
    assert_eq!(
        s.replay(dead[0].id, NOW, NOW).await.expect("replay again"),
        None
    );
    assert_eq!(
        s.reschedule("q", "nope", NOW, NOW)
            .await
            .expect("reschedule"),
        None
    );
}

#[tokio::test]
async fn a_payload_over_max_allowed_packet_is_a_clear_permanent_error() {
    let Some(s) = store("").await else { return };
    let max: i64 = sqlx::query_scalar("SELECT CAST(@@max_allowed_packet AS SIGNED)")
        .fetch_one(s.pool())
        .await
        .expect("max_allowed_packet");
    let huge = vec![7u8; max as usize];
    let e = s
        .schedule(
            vec![TimerSpec::new("q", "big", NOW).with_payload(huge)],
            NOW,
        )
        .await
        .expect_err("too big");
    assert!(!e.is_transient(), "{e}");
    assert!(e.to_string().contains("max_allowed_packet"), "{e}");
    // A megabyte is fine and round-trips.
    let mb = vec![9u8; 1 << 20];
    s.schedule(
        vec![TimerSpec::new("q", "mb", NOW).with_payload(mb.clone())],
        NOW,
    )
    .await
    .expect("1 MiB");
    assert_eq!(
        s.get("q", "mb", NOW)
            .await
            .expect("get")
            .expect("stored")
            .payload,
        mb
    );
}
