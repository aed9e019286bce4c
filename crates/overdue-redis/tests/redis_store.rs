//! Redis-specific tests: the exact key names and record layout, two nodes racing for the same
//! timers, a dead node's claims expiring, cursors inside one millisecond, multi-queue batches.

mod common;

use std::collections::HashSet;
use std::sync::Arc;

use overdue_core::{DeadLetterQuery, Settlement, Store, TimerRef, TimerSpec, TimerState};
use overdue_redis::RedisStore;

const T0: i64 = 1_700_000_000_000;

async fn hget(con: &mut redis::aio::MultiplexedConnection, key: &str, field: &str) -> Option<Vec<u8>> {
    redis::cmd("HGET").arg(key).arg(field).query_async(con).await.expect("HGET")
}

async fn zscore(con: &mut redis::aio::MultiplexedConnection, key: &str, member: &str) -> Option<i64> {
    redis::cmd("ZSCORE").arg(key).arg(member).query_async(con).await.expect("ZSCORE")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_names_and_record_layout_are_as_documented() {
    let Some(f) = common::Fresh::new().await else { return };
    let store = RedisStore::open_url(&f.node_url("n1")).await.expect("open");
    let p = f.prefix.clone();
    assert_eq!((store.prefix(), store.node()), (p.as_str(), "n1"));
    let k = store.queue_keys("order.close");
    let tag = format!("{{{p}:q:order.close}}");
    assert_eq!(
        k.all(),
        [
            format!("{tag}:due").as_str(),
            format!("{tag}:t").as_str(),
            format!("{tag}:fly").as_str(),
            format!("{tag}:lease").as_str(),
            format!("{tag}:owner").as_str(),
            format!("{tag}:err").as_str(),
            format!("{tag}:dead").as_str(),
        ]
    );
    let g = store.global_keys();
    assert_eq!(
        [g.generation.as_str(), g.queues.as_str(), g.dead_id.as_str(), g.dead_index.as_str()],
        [format!("{p}:gen"), format!("{p}:queues"), format!("{p}:dlid"), format!("{p}:dlq")]
    );

    let gens = store
        .schedule(vec![TimerSpec::new("order.close", "o-1", T0 + 5).with_payload(b"a,b\0".to_vec())], T0)
        .await
        .expect("schedule");
    let mut con = f.con();
    assert_eq!(zscore(&mut con, &k.due, "o-1").await, Some(T0 + 5));
    let rec = hget(&mut con, &k.timers, "o-1").await.expect("record");
    assert_eq!(rec, format!("{},0,{T0},0,a,b\0", gens[0]).into_bytes());
    let gen_counter: u64 = redis::cmd("GET").arg(&g.generation).query_async(&mut con).await.expect("GET");
    assert_eq!(gen_counter, gens[0]);
    let queues: Vec<String> = redis::cmd("SMEMBERS").arg(&g.queues).query_async(&mut con).await.expect("SMEMBERS");
    assert_eq!(queues, ["order.close"]);

    // A claim writes the lease and its owner; a retry rewrites the record and records the error.
    let r = TimerRef { queue: "order.close".into(), key: "o-1".into(), generation: gens[0], due_at: T0 + 5 };
    assert_eq!(store.claim(std::slice::from_ref(&r), "node-a", T0 + 10, T0 + 1_000).await.expect("claim").len(), 1);
    assert_eq!(zscore(&mut con, &k.lease, "o-1").await, Some(T0 + 1_000));
    assert_eq!((zscore(&mut con, &k.due, "o-1").await, zscore(&mut con, &k.fly, "o-1").await), (None, Some(T0 + 5)));
    assert_eq!(hget(&mut con, &k.owner, "o-1").await.as_deref(), Some(&b"node-a"[..]));
    let retry = Settlement::Retry { timer: r.clone(), due_at: T0 + 2_000, attempts: 1, error: "boom".into() };
    store.settle(vec![retry], T0 + 20).await.expect("settle");
    assert_eq!(hget(&mut con, &k.timers, "o-1").await, Some(format!("{},1,{T0},20,a,b\0", gens[0]).into_bytes()));
    assert_eq!(zscore(&mut con, &k.due, "o-1").await, Some(T0 + 2_000));
    assert_eq!(zscore(&mut con, &k.lease, "o-1").await, None);
    assert_eq!(hget(&mut con, &k.owner, "o-1").await, None);
    assert_eq!(hget(&mut con, &k.error, "o-1").await.as_deref(), Some(&b"boom"[..]));

    // A dead letter is one ZSET member scored by its id, and its queue is indexed by id.
    let dead = Settlement::DeadLetter { timer: r.clone(), attempts: 2, error: "bad".into(), failed_at: T0 + 30 };
    store.settle(vec![dead], T0 + 30).await.expect("settle");
    let members: Vec<Vec<u8>> = redis::cmd("ZRANGE").arg(&k.dead).arg(0).arg(-1).query_async(&mut con).await.expect("ZRANGE");
    assert_eq!(members, [format!("1,{},{},2,{},3,3,o-1bada,b\0", gens[0], T0 + 2_000, T0 + 30).into_bytes()]);
    assert_eq!(hget(&mut con, &g.dead_index, "1").await.as_deref(), Some(&b"order.close"[..]));
    for key in [&k.due, &k.timers, &k.fly, &k.lease, &k.owner, &k.error] {
        let n: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut con).await.expect("EXISTS");
        assert_eq!(n, 0, "{key} should be empty after the dead letter moved out");
    }
    let g2 = store.replay(1, T0 + 40, T0 + 40).await.expect("replay").expect("found");
    assert!(g2 > gens[0]);
    assert_eq!(hget(&mut con, &k.timers, "o-1").await, Some(format!("{g2},0,{},0,a,b\0", T0 + 40).into_bytes()));
    assert_eq!(hget(&mut con, &g.dead_index, "1").await, None);
    assert!(store.replay(1, T0, T0).await.expect("replay").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_nodes_claiming_at_once_never_both_win() {
    let Some(f) = common::Fresh::new().await else { return };
    let a = Arc::new(RedisStore::open_url(&f.node_url("a")).await.expect("open a"));
    let b = Arc::new(RedisStore::open_url(&f.node_url("b")).await.expect("open b"));
    let n = 2_000;
    let specs: Vec<TimerSpec> = (0..n).map(|i| TimerSpec::new(if i % 2 == 0 { "q1" } else { "q2" }, format!("k{i}"), T0)).collect();
    let gens = a.schedule(specs.clone(), T0).await.expect("schedule");
    let refs: Vec<TimerRef> = specs
        .iter()
        .zip(&gens)
        .map(|(s, g)| TimerRef { queue: s.queue.clone(), key: s.key.clone(), generation: *g, due_at: T0 })
        .collect();
    // Both nodes claim every timer in batches of 100 (explicit refs) and by scan, at once.
    let mut tasks = Vec::new();
    for (store, owner) in [(a.clone(), "a"), (b.clone(), "b")] {
        let refs = refs.clone();
        tasks.push(tokio::spawn(async move {
            let mut won = Vec::new();
            for chunk in refs.chunks(100) {
                for c in store.claim(chunk, owner, T0 + 1, T0 + 60_000).await.expect("claim") {
                    won.push((c.timer.queue, c.timer.key));
                }
                for c in store.claim_due(T0 + 1, T0 + 1, 50, owner, T0 + 60_000).await.expect("claim_due") {
                    won.push((c.timer.queue, c.timer.key));
                }
            }
            won
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.expect("task"));
    }
    let distinct: HashSet<_> = all.iter().cloned().collect();
    assert_eq!(all.len(), distinct.len(), "a timer was claimed twice");
    assert_eq!(distinct.len(), n, "every timer claimed exactly once");
    // Leases are live: nobody can claim any more.
    assert!(a.claim_due(T0 + 2, T0 + 2, 10_000, "a", T0 + 60_000).await.expect("claim_due").is_empty());
    // Node b dies (stops settling). After the lease, a takes over its claims, and only those.
    let b_keys: HashSet<String> = {
        let mut s = HashSet::new();
        for q in ["q1", "q2"] {
            let list = a
                .list(&overdue_core::ListQuery { queue: Some(q.into()), limit: 10_000, ..Default::default() }, T0 + 2)
                .await
                .expect("list");
            for t in list {
                if let TimerState::InFlight { owner, .. } = t.state
                    && owner == "b"
                {
                    s.insert(t.key);
                }
            }
        }
        s
    };
    assert!(!b_keys.is_empty(), "both nodes should have won some claims");
    drop(b);
    let a_claims: Vec<Settlement> =
        refs.iter().filter(|r| !b_keys.contains(&r.key)).map(|r| Settlement::Done(r.clone())).collect();
    a.settle(a_claims, T0 + 3).await.expect("settle");
    let mut taken = HashSet::new();
    loop {
        let got = a.claim_due(T0 + 60_000, T0 + 60_000, 500, "a", T0 + 120_000).await.expect("claim_due");
        if got.is_empty() {
            break;
        }
        taken.extend(got.into_iter().map(|c| c.timer.key));
    }
    assert_eq!(taken, b_keys, "after the lease exactly the dead node's timers are claimable again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_refs_pages_inside_one_millisecond_and_across_queues() {
    let Some(f) = common::Fresh::new().await else { return };
    let store = RedisStore::open_url(&f.url).await.expect("open");
    // 3 queues, 700 timers each, all due in the same millisecond, scheduled in one batch.
    let specs: Vec<TimerSpec> =
        (0..2_100).map(|i| TimerSpec::new(["a", "b", "c"][i % 3], format!("k{:04}", i / 3), T0)).collect();
    store.schedule(specs, T0).await.expect("schedule");
    let one = store.claim(&store.due_refs(None, T0, 1).await.expect("refs"), "x", T0, T0 + 10).await.expect("claim");
    assert_eq!(one.len(), 1, "in-flight timers are listed too");
    let mut seen = Vec::new();
    let mut cursor = None;
    loop {
        let page = store.due_refs(cursor.as_ref(), T0, 128).await.expect("refs");
        if page.is_empty() {
            break;
        }
        cursor = page.last().map(|r| (r.due_at, r.queue.clone(), r.key.clone()));
        seen.extend(page.into_iter().map(|r| (r.due_at, r.queue, r.key)));
    }
    let mut sorted = seen.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!(seen, sorted, "strictly increasing (due_at, queue, key)");
    assert_eq!(seen.len(), 2_100);
    assert!(store.due_refs(None, T0 - 1, 10).await.expect("refs").is_empty());
    let counts = store.counts(T0).await.expect("counts");
    assert_eq!(counts.iter().fold((0, 0), |(p, f), c| (p + c.pending, f + c.in_flight)), (2_099, 1), "{counts:?}");
    assert!(store.dead_letters(&DeadLetterQuery::default()).await.expect("dead").is_empty());
}
