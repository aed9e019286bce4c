//! Rough throughput of the Redisson layout on the test Redis, ignored by default:
//! `cargo test -p overdue-redisson --release --test throughput -- --ignored --nocapture`.
//! Schedules N timers in batches, then claims (claim_due) and settles them Done in batches,
//! once with due order = offer order (due items at the head of the ordered list, cheap `LREM`)
//! and once reversed (due items at its tail: the `LREM` worst case).

mod common;

use std::time::Instant;

use overdue_core::{Settlement, Store, TimerSpec};
use overdue_redisson::RedissonStore;

const T0: i64 = 1_700_000_000_000;
const N: i64 = 20_000;
const BATCH: i64 = 1_000;

async fn run(reversed: bool) {
    let Some(f) = common::Fresh::new("codec=bytes").await else { return };
    let store = RedissonStore::open_url(&f.url).await.expect("open");
    let t = Instant::now();
    for b in 0..N / BATCH {
        let specs = (0..BATCH)
            .map(|i| {
                let n = b * BATCH + i;
                let due = if reversed { T0 + N - n } else { T0 + n };
                TimerSpec::new("q", format!("k{n}"), due).with_payload(vec![b'x'; 32])
            })
            .collect();
        store.schedule(specs, T0).await.expect("schedule");
    }
    let sched = t.elapsed();
    let t = Instant::now();
    let mut fired = 0;
    loop {
        let c = store.claim_due(T0 + N, T0 + N, BATCH as u32, "bench", T0 + N + 60_000).await.expect("claim");
        if c.is_empty() {
            break;
        }
        fired += c.len();
        store.settle(c.into_iter().map(|c| Settlement::Done(c.timer)).collect(), T0 + N).await.expect("settle");
    }
    let fire = t.elapsed();
    assert_eq!(fired as i64, N);
    println!(
        "{} {N} timers, batches of {BATCH}: scheduled {:.0}/s, claimed+done {:.0}/s",
        if reversed { "due order reversed:" } else { "due order = offer order:" },
        N as f64 / sched.as_secs_f64(),
        N as f64 / fire.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a measurement, not a check"]
async fn throughput() {
    run(false).await;
    run(true).await;
}
