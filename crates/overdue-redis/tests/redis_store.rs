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
        g.all(),
        [format!("{p}:gen"), format!("{p}:queues"), format!("{p}:dlid"), format!("{p}:dlq"), format!("{p}:layout")]
    );

    let gens = store
        .schedule(vec![TimerSpec::new("order.close", "o-1", T0 + 5).with_payload(b"a,b\0".to_vec())], T0)
        .await
        .expect("schedule");
    let mut con = f.con();
    // The due member carries the generation, so the window load reads no record.
    let member = format!("o-1\0{}", gens[0]);
    assert_eq!(zscore(&mut con, &k.due, &member).await, Some(T0 + 5));
    assert_eq!(zscore(&mut con, &k.due, "o-1").await, None);
    let rec = hget(&mut con, &k.timers, "o-1").await.expect("record");
    assert_eq!(rec, format!("{},0,{T0},0,5,a,b\0", gens[0]).into_bytes());
    let layout: String = redis::cmd("GET").arg(&g.layout).query_async(&mut con).await.expect("GET");
    assert_eq!(layout, overdue_redis::LAYOUT);
    let gen_counter: u64 = redis::cmd("GET").arg(&g.generation).query_async(&mut con).await.expect("GET");
    assert_eq!(gen_counter, gens[0]);
    let queues: Vec<String> = redis::cmd("SMEMBERS").arg(&g.queues).query_async(&mut con).await.expect("SMEMBERS");
    assert_eq!(queues, ["order.close"]);

    // A claim moves the timer to fly under a new lease id, and writes the lease and its owner
    // once; a retry rewrites the record, records the error, and (nothing left in flight) drops
    // the spent lease.
    let r = TimerRef { queue: "order.close".into(), key: "o-1".into(), generation: gens[0], due_at: T0 + 5 };
    assert_eq!(store.claim(std::slice::from_ref(&r), "node-a", T0 + 10, T0 + 1_000).await.expect("claim").len(), 1);
    assert_eq!((zscore(&mut con, &k.due, &member).await, zscore(&mut con, &k.fly, "o-1").await), (None, Some(1)));
    assert_eq!(zscore(&mut con, &k.lease, "1").await, Some(T0 + 1_000));
    assert_eq!(hget(&mut con, &k.owner, "1").await.as_deref(), Some(&b"node-a"[..]));
    assert_eq!(hget(&mut con, &k.owner, "0").await.as_deref(), Some(&b"1"[..]), "the last lease id");
    assert_eq!(hget(&mut con, &k.timers, "o-1").await, Some(rec), "a claim leaves the record alone");
    let retry = Settlement::Retry { timer: r.clone(), due_at: T0 + 2_000, attempts: 1, error: "boom".into() };
    store.settle(vec![retry], T0 + 20).await.expect("settle");
    assert_eq!(hget(&mut con, &k.timers, "o-1").await, Some(format!("{},1,{T0},20,2000,a,b\0", gens[0]).into_bytes()));
    assert_eq!((zscore(&mut con, &k.due, &member).await, zscore(&mut con, &k.fly, "o-1").await), (Some(T0 + 2_000), None));
    for key in [&k.lease, &k.owner] {
        let n: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut con).await.expect("EXISTS");
        assert_eq!(n, 0, "{key}: the spent lease is gone");
    }
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
    assert_eq!(hget(&mut con, &k.timers, "o-1").await, Some(format!("{g2},0,{},0,0,a,b\0", T0 + 40).into_bytes()));
    let members: Vec<String> = redis::cmd("ZRANGE").arg(&k.due).arg(0).arg(-1).query_async(&mut con).await.expect("ZRANGE");
    assert_eq!(members, [format!("o-1\0{g2}")], "the replayed timer is due under its new generation only");
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
    assert_eq!(one.len(), 1);
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
    assert_eq!(seen.len(), 2_099, "every pending timer; the claimed one is left out (the claim would refuse it)");
    assert!(store.due_refs(None, T0 - 1, 10).await.expect("refs").is_empty());
    let counts = store.counts(T0).await.expect("counts");
    assert_eq!(counts.iter().fold((0, 0), |(p, f), c| (p + c.pending, f + c.in_flight)), (2_099, 1), "{counts:?}");
    assert!(store.dead_letters(&DeadLetterQuery::default()).await.expect("dead").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_lease_per_claim_whatever_its_size() {
    let Some(f) = common::Fresh::new().await else { return };
    let a = RedisStore::open_url(&f.node_url("a")).await.expect("open a");
    let b = RedisStore::open_url(&f.node_url("b")).await.expect("open b");
    let specs: Vec<TimerSpec> = (0..300).map(|i| TimerSpec::new("q", format!("k{i:03}"), T0)).collect();
    let gens = a.schedule(specs.clone(), T0).await.expect("schedule");
    let refs: Vec<TimerRef> =
        specs.iter().zip(&gens).map(|(s, g)| TimerRef { queue: "q".into(), key: s.key.clone(), generation: *g, due_at: T0 }).collect();
    // Two claims of 100 by a (leases until T0+1000 and T0+2000), one of 100 by b.
    assert_eq!(a.claim(&refs[..100], "a", T0, T0 + 1_000).await.expect("claim").len(), 100);
    assert_eq!(a.claim(&refs[100..200], "a", T0, T0 + 2_000).await.expect("claim").len(), 100);
    assert_eq!(b.claim(&refs[200..], "b", T0, T0 + 3_000).await.expect("claim").len(), 100);
    let k = a.queue_keys("q");
    let mut con = f.con();
    let leases: Vec<(String, i64)> =
        redis::cmd("ZRANGE").arg(&k.lease).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut con).await.expect("ZRANGE");
    assert_eq!(leases, [("1".into(), T0 + 1_000), ("2".into(), T0 + 2_000), ("3".into(), T0 + 3_000)], "three entries for 300 timers");
    assert_eq!(zscore(&mut con, &k.fly, "k150").await, Some(2));
    let state = |t: Option<overdue_core::Timer>| t.expect("timer").state;
    assert_eq!(state(a.get("q", "k250", T0).await.expect("get")), TimerState::InFlight { owner: "b".into(), lease_until: T0 + 3_000 });
    let c = a.counts(T0).await.expect("counts");
    assert_eq!((c[0].pending, c[0].in_flight), (0, 300));
    // After the first lease only its 100 are in flight no more, and only they can be taken over,
    // by claim (refs) as by claim_due.
    let c = a.counts(T0 + 1_000).await.expect("counts");
    assert_eq!((c[0].pending, c[0].in_flight), (100, 200));
    assert!(b.claim(&refs[100..110], "b", T0 + 1_000, T0 + 9_000).await.expect("claim").is_empty());
    assert_eq!(b.claim(&refs[..10], "b", T0 + 1_000, T0 + 9_000).await.expect("claim").len(), 10);
    let rest = b.claim_due(T0 + 1_000, T0 + 1_000, 1_000, "b", T0 + 9_000).await.expect("claim_due");
    let keys: Vec<&str> = rest.iter().map(|c| c.timer.key.as_str()).collect();
    let want: Vec<String> = (10..100).map(|i| format!("k{i:03}")).collect();
    assert_eq!(keys, want, "exactly the expired lease's other timers, in order");
    assert_eq!(rest[0].timer.due_at, T0);
    // Lease 1 holds nothing now: the claim that emptied it dropped it.
    assert_eq!(zscore(&mut con, &k.lease, "1").await, None, "the spent lease is gone");
    assert_eq!(hget(&mut con, &k.owner, "1").await, None, "and its owner with it");
    assert!(b.claim_due(T0 + 1_000, T0 + 1_000, 1_000, "b", T0 + 9_000).await.expect("claim_due").is_empty());
    // Settling everything leaves nothing behind in fly, lease or owner.
    let done: Vec<Settlement> = refs.iter().cloned().map(Settlement::Done).collect();
    a.settle(done, T0 + 1_001).await.expect("settle");
    for key in [&k.due, &k.timers, &k.fly, &k.lease, &k.owner] {
        let n: i64 = redis::cmd("EXISTS").arg(key).query_async(&mut con).await.expect("EXISTS");
        assert_eq!(n, 0, "{key} should be gone once nothing is in flight");
    }
}

/// One claim by reference that mixes every case the claim script sorts apart: pending and due
/// (taken by the member's score alone), in flight under an expired lease (the checked path), a
/// stale generation, a key named twice, one not yet due, one that does not exist. Each claimable
/// timer is won once, in input order, with its record (due time, attempts, payload) intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_claim_by_reference_wins_each_claimable_timer_once() {
    let Some(f) = common::Fresh::new().await else { return };
    let store = RedisStore::open_url(&f.node_url("live")).await.expect("open");
    let mut specs: Vec<TimerSpec> = (0..6).map(|i| TimerSpec::new("q", format!("k{i}"), T0).with_payload(format!("p{i},\0x"))).collect();
    specs.push(TimerSpec::new("q", "later", T0 + 5_000));
    let gens = store.schedule(specs.clone(), T0).await.expect("schedule");
    let r = |i: usize| TimerRef { queue: "q".into(), key: specs[i].key.clone(), generation: gens[i], due_at: specs[i].due_at };
    // k0 and k1 claimed by a node that dies; k2 rescheduled (its ref goes stale).
    assert_eq!(store.claim(&[r(0), r(1)], "dead", T0, T0 + 1_000).await.expect("claim").len(), 2);
    let new_k2 = store.reschedule("q", "k2", T0, T0).await.expect("reschedule").expect("k2 exists");
    let ghost = TimerRef { queue: "q".into(), key: "ghost".into(), generation: 1, due_at: T0 };
    let batch = [r(0), r(3), r(3), r(2), r(1), r(4), r(6), ghost, r(5)];
    let won = store.claim(&batch, "live", T0 + 1_000, T0 + 9_000).await.expect("claim");
    let got: Vec<(&str, u64, i64, u32, &[u8])> =
        won.iter().map(|c| (c.timer.key.as_str(), c.timer.generation, c.timer.due_at, c.attempts, &c.payload[..])).collect();
    let want: Vec<(&str, u64, i64, u32, &[u8])> = [0, 3, 1, 4, 5]
        .iter()
        .map(|&i| (specs[i].key.as_str(), gens[i], T0, 0, specs[i].payload.as_slice()))
        .collect();
    assert_eq!(got, want, "the expired claims and the pending due timers, once each, in input order");
    for i in [0, 1, 3, 4, 5] {
        let t = store.get("q", &specs[i].key, T0 + 1_000).await.expect("get").expect("timer");
        assert_eq!(t.state, TimerState::InFlight { owner: "live".into(), lease_until: T0 + 9_000 }, "{}", specs[i].key);
    }
    // Untouched: the rescheduled timer (pending under its new generation) and the later one.
    let k2 = store.get("q", "k2", T0 + 1_000).await.expect("get").expect("k2");
    assert_eq!((k2.generation, k2.state), (new_k2, TimerState::Pending));
    let later = store.get("q", "later", T0 + 1_000).await.expect("get").expect("later");
    assert_eq!(later.state, TimerState::Pending);
    // Nothing is won twice: the same batch again wins nothing.
    assert!(store.claim(&batch, "live", T0 + 1_000, T0 + 9_000).await.expect("claim").is_empty());
}

/// A node that died holding a claim, while the others went on claiming and settling: its claim
/// must not hide behind theirs. Settled claims leave `lease` at once, and a sweep for expired
/// leases passes over spent ones (here planted by hand) without using up its room.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_nodes_claim_is_found_behind_many_spent_ones() {
    let Some(f) = common::Fresh::new().await else { return };
    let store = RedisStore::open_url(&f.node_url("live")).await.expect("open");
    let k = store.queue_keys("q");
    let mut con = f.con();
    let gens = store.schedule(vec![TimerSpec::new("q", "stranded", T0)], T0).await.expect("schedule");
    let stranded = TimerRef { queue: "q".into(), key: "stranded".into(), generation: gens[0], due_at: T0 };
    assert_eq!(store.claim(std::slice::from_ref(&stranded), "dead", T0, T0 + 1_000).await.expect("claim").len(), 1);
    // 300 one-timer claims, each settled (done, released (then cancelled), retried, cancelled or
    // rescheduled in flight: none of them due again before T0 + 60 s), under leases that run out before the dead node's.
    for i in 0..300 {
        let key = format!("k{i:03}");
        let g = store.schedule(vec![TimerSpec::new("q", key.clone(), T0)], T0).await.expect("schedule")[0];
        let r = TimerRef { queue: "q".into(), key: key.clone(), generation: g, due_at: T0 };
        assert_eq!(store.claim(std::slice::from_ref(&r), "live", T0, T0 + 500).await.expect("claim").len(), 1);
        match i % 5 {
            0 => store.settle(vec![Settlement::Done(r)], T0).await.expect("settle"),
            1 => {
                store.settle(vec![Settlement::Release(r)], T0).await.expect("settle");
                assert!(store.cancel("q", &key).await.expect("cancel").is_some(), "released, so pending");
            }
            2 => {
                let retry = Settlement::Retry { timer: r, due_at: T0 + 60_000, attempts: 1, error: "e".into() };
                store.settle(vec![retry], T0).await.expect("settle")
            }
            3 => assert!(store.cancel("q", &key).await.expect("cancel").is_some()),
            _ => {
                store.schedule(vec![TimerSpec::new("q", key.clone(), T0 + 60_000)], T0).await.expect("reschedule");
            }
        }
    }
    let leases: Vec<(String, i64)> =
        redis::cmd("ZRANGE").arg(&k.lease).arg(0).arg(-1).arg("WITHSCORES").query_async(&mut con).await.expect("ZRANGE");
    assert_eq!(leases, [("1".into(), T0 + 1_000)], "only the dead node's claim is left in lease");
    let owners: i64 = redis::cmd("HLEN").arg(&k.owner).query_async(&mut con).await.expect("HLEN");
    assert_eq!(owners, 2, "its owner and the last lease id");

    // Spent leases that expired first (as an older version could leave them): the sweep drops
    // them and still finds the stranded claim, in one call with room for one timer.
    let mut planted = redis::cmd("ZADD");
    planted.arg(&k.lease);
    for id in 1_000..1_600 {
        planted.arg(T0 + 100).arg(id);
    }
    let _: i64 = planted.query_async(&mut con).await.expect("ZADD");
    assert!(store.claim_due(T0 + 999, T0 + 999, 1, "live", T0 + 5_000).await.expect("claim_due").is_empty(), "the lease still runs");
    let left: i64 = redis::cmd("ZCARD").arg(&k.lease).query_async(&mut con).await.expect("ZCARD");
    assert_eq!(left, 1, "the sweep dropped the spent leases it passed");
    let _: i64 = planted.query_async(&mut con).await.expect("ZADD");
    let got = store.claim_due(T0 + 1_000, T0 + 1_000, 1, "live", T0 + 5_000).await.expect("claim_due");
    assert_eq!(got.iter().map(|c| c.timer.key.as_str()).collect::<Vec<_>>(), ["stranded"]);
    assert_eq!(got[0].timer.generation, gens[0]);
    let leases: Vec<String> = redis::cmd("ZRANGE").arg(&k.lease).arg(0).arg(-1).query_async(&mut con).await.expect("ZRANGE");
    assert_eq!(leases.len(), 1, "the dead node's lease went with its timer, the new one stays: {leases:?}");
    assert_eq!(hget(&mut con, &k.owner, &leases[0]).await.as_deref(), Some(&b"live"[..]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_prefix_in_another_layout_is_refused_and_left_alone() {
    let Some(f) = common::Fresh::new().await else { return };
    let store = RedisStore::open_url(&f.url).await.expect("open");
    store.schedule(vec![TimerSpec::new("q", "k", T0)], T0).await.expect("schedule");
    let g = store.global_keys().clone();
    let k = store.queue_keys("q");
    let mut con = f.con();
    // A prefix stamped with another layout is refused, naming both layouts and the way out.
    let _: () = redis::cmd("SET").arg(&g.layout).arg("3").query_async(&mut con).await.expect("SET");
    let e = RedisStore::open_url(&f.url).await.expect_err("layout 3");
    let msg = e.to_string();
    assert!(msg.contains("key layout 3") && msg.contains("reads layout 2") && msg.contains("prefix="), "{msg}");
    // No stamp but timer records: written by a version before the stamp (layout 1).
    let _: () = redis::cmd("DEL").arg(&g.layout).query_async(&mut con).await.expect("DEL");
    let e = RedisStore::open_url(&f.url).await.expect_err("layout 1");
    assert!(e.to_string().contains("key layout 1"), "{e}");
    let n: i64 = redis::cmd("EXISTS").arg(&g.layout).query_async(&mut con).await.expect("EXISTS");
    assert_eq!(n, 0, "a refused open writes nothing");
    assert!(hget(&mut con, &k.timers, "k").await.is_some(), "and leaves the timers alone");
    // A prefix whose queues hold no records (drained) is stamped and used.
    let _: i64 = redis::cmd("DEL").arg(&k.timers).arg(&k.due).query_async(&mut con).await.expect("DEL");
    RedisStore::open_url(&f.url).await.expect("a drained prefix opens");
    let stamp: String = redis::cmd("GET").arg(&g.layout).query_async(&mut con).await.expect("GET");
    assert_eq!(stamp, overdue_redis::LAYOUT);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_clock_is_behind_still_writes_readable_records() {
    let Some(f) = common::Fresh::new().await else { return };
    let a = RedisStore::open_url(&f.node_url("a")).await.expect("open a");
    // Created by a node at T0, replaced by one whose clock reads 500 ms earlier, due before both.
    a.schedule(vec![TimerSpec::new("q", "k", T0 + 100)], T0).await.expect("schedule");
    let g = a.schedule(vec![TimerSpec::new("q", "k", T0 - 900).with_payload(b"p".to_vec())], T0 - 500).await.expect("replace")[0];
    let mut con = f.con();
    let rec = hget(&mut con, &a.queue_keys("q").timers, "k").await.expect("record");
    assert_eq!(rec, format!("{g},0,{T0},-500,-900,p").into_bytes());
    let t = a.get("q", "k", T0 - 500).await.expect("get").expect("timer");
    assert_eq!((t.created_at, t.updated_at, t.due_at, t.generation), (T0, T0 - 500, T0 - 900, g));
    let r = TimerRef { queue: "q".into(), key: "k".into(), generation: g, due_at: T0 - 900 };
    let won = a.claim(std::slice::from_ref(&r), "a", T0 - 500, T0 + 1_000).await.expect("claim");
    assert_eq!(won.len(), 1, "the skewed record is claimable");
    assert_eq!(won[0].payload, b"p");
    a.settle(vec![Settlement::Done(r)], T0 - 400).await.expect("settle");
    assert!(a.get("q", "k", T0).await.expect("get").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_timer_is_due_once_under_its_last_generation() {
    let Some(f) = common::Fresh::new().await else { return };
    let s = RedisStore::open_url(&f.url).await.expect("open");
    let k = s.queue_keys("q");
    let mut con = f.con();
    let members = async |con: &mut redis::aio::MultiplexedConnection| -> Vec<(String, i64)> {
        redis::cmd("ZRANGE").arg(&k.due).arg(0).arg(-1).arg("WITHSCORES").query_async(con).await.expect("ZRANGE")
    };
    // The same key twice in one batch, then again in a later batch, then rescheduled.
    let g = s
        .schedule(vec![TimerSpec::new("q", "k", T0 + 1), TimerSpec::new("q", "j", T0 + 3), TimerSpec::new("q", "k", T0 + 2)], T0)
        .await
        .expect("schedule");
    assert!(g[0] < g[2]);
    assert_eq!(members(&mut con).await, [(format!("k\0{}", g[2]), T0 + 2), (format!("j\0{}", g[1]), T0 + 3)]);
    let g3 = s.schedule(vec![TimerSpec::new("q", "k", T0 + 5)], T0).await.expect("schedule")[0];
    let g4 = s.reschedule("q", "j", T0 + 4, T0).await.expect("reschedule").expect("found");
    assert_eq!(members(&mut con).await, [(format!("j\0{g4}"), T0 + 4), (format!("k\0{g3}"), T0 + 5)]);
    let refs = s.due_refs(None, T0 + 10, 10).await.expect("due_refs");
    let got: Vec<(&str, u64, i64)> = refs.iter().map(|r| (r.key.as_str(), r.generation, r.due_at)).collect();
    assert_eq!(got, [("j", g4, T0 + 4), ("k", g3, T0 + 5)]);
    // A stale reference (the first generation) claims nothing; the live one claims.
    let stale = TimerRef { queue: "q".into(), key: "k".into(), generation: g[0], due_at: T0 + 1 };
    assert!(s.claim(&[stale], "n", T0 + 10, T0 + 1_000).await.expect("claim").is_empty());
    assert_eq!(s.claim(&refs, "n", T0 + 10, T0 + 1_000).await.expect("claim").len(), 2);
    assert!(members(&mut con).await.is_empty());
    assert!(s.cancel("q", "k").await.expect("cancel").is_some());
}
