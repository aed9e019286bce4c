//! Three nodes on one database split the 64 partitions, hand them over on a graceful close at
//! once, and take a vanished node's partitions once its (real-time, database-clock) lease
//! expires.

mod common;

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use overdue_core::Store;
use overdue_mysql::{MysqlStore, PARTITIONS};

async fn open(url: &str, node: &str) -> MysqlStore {
    MysqlStore::open_url(&format!("{url}&node={node}"))
        .await
        .expect("open")
}

/// Panics if a partition is owned twice; returns how many each store owns.
fn split(stores: &[&MysqlStore]) -> Vec<usize> {
    let mut seen = BTreeSet::new();
    for s in stores {
        for p in s.owned_partitions() {
            assert!((0..PARTITIONS).contains(&p), "partition {p} out of range");
            assert!(
                seen.insert(p),
                "partition {p} owned twice: {:?}",
                stores
                    .iter()
                    .map(|s| s.owned_partitions())
                    .collect::<Vec<_>>()
            );
        }
    }
    stores.iter().map(|s| s.owned_partitions().len()).collect()
}

/// Rebalances every store, round after round, until `done` holds for the split (at most 10
/// rounds). Returns the split.
async fn converge(stores: &[&MysqlStore], done: impl Fn(&[usize]) -> bool) -> Vec<usize> {
    let mut last = Vec::new();
    for _ in 0..10 {
        for s in stores {
            s.rebalance().await.expect("rebalance");
        }
        last = split(stores);
        if done(&last) {
            return last;
        }
    }
    panic!("the partitions did not settle: last split {last:?}");
}

/// Owners in the database with a live lease, and how many partitions each holds.
async fn owners_in_db(store: &MysqlStore) -> Vec<(String, i64)> {
    sqlx::query_as::<_, (Vec<u8>, i64)>(
        "SELECT owner, COUNT(*) FROM overdue_partitions \
         WHERE owner IS NOT NULL AND lease_until > CAST(UNIX_TIMESTAMP(NOW(3)) * 1000 AS SIGNED) \
         GROUP BY owner ORDER BY owner",
    )
    .fetch_all(store.pool())
    .await
    .expect("owners")
    .into_iter()
    .map(|(o, n)| (String::from_utf8_lossy(&o).into_owned(), n))
    .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_split_hand_over_and_take_over() {
    let Some(url) = common::fresh_url("partition_lease_ms=2000").await else {
        return;
    };
    let a = open(&url, "node-a").await;
    assert_eq!(
        a.owned_partitions().len(),
        PARTITIONS as usize,
        "a lone node owns everything from open"
    );
    let b = open(&url, "node-b").await;
    let c = open(&url, "node-c").await;

    // Three live nodes: shares of ceil(64 / 3) = 22; every partition owned once.
    let three = converge(&[&a, &b, &c], |s| {
        s.iter().sum::<usize>() == 64 && s.iter().all(|n| (20..=22).contains(n))
    })
    .await;
    assert_eq!([a.live_nodes(), b.live_nodes(), c.live_nodes()], [3, 3, 3]);
    let db = owners_in_db(&a).await;
    assert_eq!(db.len(), 3, "{db:?}");
    assert_eq!(db.iter().map(|(_, n)| *n).sum::<i64>(), 64, "{db:?}");
    eprintln!("three nodes: {three:?}");

    // A graceful close hands c's partitions over at the next round, not after the lease.
    let epoch = a.ownership_epoch();
    c.close().await.expect("close");
    assert!(c.owned_partitions().is_empty());
    let two = converge(&[&a, &b], |s| s == [32, 32]).await;
    assert_eq!([a.live_nodes(), b.live_nodes()], [2, 2]);
    assert!(
        a.ownership_epoch() > epoch,
        "gaining partitions bumps the ownership epoch"
    );
    eprintln!("after close: {two:?}");

    // b vanishes without closing: its leases run out (2 s on the database clock) and a
    // takes everything. Polled in real time, bounded.
    drop(b);
    let start = Instant::now();
    loop {
        let owned = a.rebalance().await.expect("rebalance");
        if owned.len() == PARTITIONS as usize {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "a took only {} partitions in 10 s",
            owned.len()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let took = start.elapsed();
    assert!(
        took >= Duration::from_millis(200),
        "b's leases were taken before they could expire ({took:?})"
    );
    assert_eq!(a.live_nodes(), 1);
    assert_eq!(owners_in_db(&a).await, vec![("node-a".to_owned(), 64)]);
    eprintln!("took over a vanished node's partitions in {took:?}");
    a.close().await.expect("close");
}
