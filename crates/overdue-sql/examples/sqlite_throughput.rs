//! Throughput of the SQLite store: durable schedules per second, and claim + settle per second.
//!
//! ```text
//! cargo run --release -p overdue-sql --example sqlite_throughput [-- TOTAL [DIR [FILTER]]]
//! ```
//!
//! FILTER runs only the scenarios whose name contains it (e.g. `claim_due`, `Full, 8 tasks`).
//!
//! Each scenario opens a fresh database in DIR (default: a temporary directory), schedules TOTAL
//! timers (default 200,000) from concurrent tokio tasks in batches, waits for every `schedule`
//! to return (so every timer is committed at the stated durability), and prints timers/s and
//! how many messages each group commit carried. The claim scenarios then drain a database of
//! due timers with `claim_due` or `claim` and `settle(Done)`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use overdue_core::{Settlement, Store, TimerRef, TimerSpec};
use overdue_sql::{Durability, SqliteOptions, SqliteStore};

const DEFAULT_TOTAL: usize = 200_000;
const T0: i64 = 1_700_000_000_000;
const MIN: i64 = 60_000;
const CLAIM_BATCH: u32 = 100;

/// When the benchmark's timers are due.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Due {
    /// As a shop makes them: order n (ids increase with time, one per ms) gets `order.close` at
    /// creation + 30 min, or `order.remind` at + 25 min, or `order.auto_confirm` at + 7 days. New
    /// timers land near a few append points of the `(due_at, queue, key)` index.
    Orders,
    /// Uniformly random over a day, keys unrelated to due order: the worst case, every insert
    /// and every claim touches a different index page.
    Random,
}

#[derive(Clone, Copy, Debug)]
struct Scenario {
    durability: Durability,
    tasks: usize,
    batch: usize,
    due: Due,
}

fn spec(due: Due, tasks: usize, task: usize, i: usize) -> TimerSpec {
    let n = (i * tasks + task) as i64;
    let (queue, due_at) = match due {
        Due::Orders => match n % 4 {
            0 | 1 => ("order.close", T0 + n + 30 * MIN),
            2 => ("order.remind", T0 + n + 25 * MIN),
            _ => ("order.auto_confirm", T0 + n + 7 * 24 * 60 * MIN),
        },
        Due::Random => {
            // A cheap scramble of n.
            let r = (n as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 20;
            ("order.close", T0 + (r % (24 * 60 * MIN as u64)) as i64)
        }
    };
    let key = format!("o-{n:010}");
    let payload = format!("{{\"order\":\"{key}\"}}").into_bytes();
    TimerSpec { queue: queue.to_owned(), key, due_at, payload }
}

async fn open(dir: &Path, name: &str, durability: Durability) -> SqliteStore {
    let path = dir.join(format!("{name}.db"));
    for suffix in ["", "-wal", "-shm", ".lock"] {
        let mut p = path.clone().into_os_string();
        p.push(suffix);
        let _ = std::fs::remove_file(PathBuf::from(p));
    }
    SqliteStore::open(&path, SqliteOptions::with_durability(durability)).await.expect("open store")
}

async fn schedule_all(store: &SqliteStore, due: Due, total: usize, tasks: usize, batch: usize) -> Duration {
    let per_task = total / tasks;
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut i = 0;
                while i < per_task {
                    let n = batch.min(per_task - i);
                    let specs: Vec<_> = (i..i + n).map(|j| spec(due, tasks, task, j)).collect();
                    store.schedule(specs, T0).await.expect("schedule");
                    i += n;
                }
            })
        })
        .collect();
    for h in handles {
        h.await.expect("task");
    }
    started.elapsed()
}

fn report(name: &str, timers: usize, elapsed: Duration, store: &SqliteStore) {
    let stats = store.stats();
    let rate = timers as f64 / elapsed.as_secs_f64();
    let per_commit = stats.messages as f64 / stats.commits.max(1) as f64;
    println!(
        "{name:<44} {timers:>8} timers {:>7.2} s {rate:>10.0} /s   {:>7} commits, {per_commit:>6.1} msgs/commit, largest {}",
        elapsed.as_secs_f64(),
        stats.commits,
        stats.largest_batch,
    );
}

async fn run_schedule(dir: &Path, total: usize, s: Scenario, filter: &str) {
    let name = format!("schedule {:?}, {} tasks x batch {}, {:?}", s.durability, s.tasks, s.batch, s.due);
    if !name.contains(filter) {
        return;
    }
    let store = open(dir, "schedule", s.durability).await;
    let total = total - total % s.tasks;
    let elapsed = schedule_all(&store, s.due, total, s.tasks, s.batch).await;
    report(&name, total, elapsed, &store);
}

/// Fills a store with due timers, then drains it from `tasks` concurrent claimers.
async fn run_claim(dir: &Path, total: usize, s: Scenario, by_refs: bool, filter: &str) {
    let Scenario { durability, tasks, due, .. } = s;
    let name = format!(
        "{} + settle {durability:?}, {tasks} tasks x {CLAIM_BATCH}, {due:?}",
        if by_refs { "claim(refs)" } else { "claim_due" }
    );
    if !name.contains(filter) {
        return;
    }
    let store = open(dir, "claim", durability).await;
    let total = total - total % tasks;
    schedule_all(&store, due, total, tasks, 100).await;
    let before = store.stats();
    // Everything is due.
    let now = T0 + 8 * 24 * 60 * MIN;
    let started = Instant::now();
    let handles: Vec<_> = (0..tasks)
        .map(|task| {
            let store = store.clone();
            tokio::spawn(async move {
                let owner = format!("node-{task}");
                let mut done = 0usize;
                let mut cursor: Option<(i64, String, String)> = None;
                loop {
                    let claimed = if by_refs {
                        // The wheel's path: page references in, then claim them by generation.
                        // Every task pages the whole table; claims decide who runs what.
                        let refs = store.due_refs(cursor.as_ref(), now, CLAIM_BATCH).await.expect("refs");
                        let Some(last) = refs.last() else { break };
                        cursor = Some((last.due_at, last.queue.clone(), last.key.clone()));
                        store.claim(&refs, &owner, now, now + 60_000).await.expect("claim")
                    } else {
                        let claimed = store
                            .claim_due(now, now, CLAIM_BATCH, &owner, now + 60_000)
                            .await
                            .expect("claim due");
                        if claimed.is_empty() {
                            break;
                        }
                        claimed
                    };
                    done += claimed.len();
                    let settle: Vec<_> =
                        claimed.into_iter().map(|c| Settlement::Done(TimerRef { ..c.timer })).collect();
                    store.settle(settle, now).await.expect("settle");
                }
                done
            })
        })
        .collect();
    let mut done = 0;
    for h in handles {
        done += h.await.expect("task");
    }
    let elapsed = started.elapsed();
    assert_eq!(done, total, "every timer claimed exactly once");
    let after = store.stats();
    let rate = done as f64 / elapsed.as_secs_f64();
    let commits = after.commits - before.commits;
    let msgs = after.messages - before.messages;
    println!(
        "{name:<44} {done:>8} timers {:>7.2} s {rate:>10.0} /s   {commits:>7} commits, {:>6.1} msgs/commit",
        elapsed.as_secs_f64(),
        msgs as f64 / commits.max(1) as f64,
    );
}

#[tokio::main]
async fn main() {
    let mut args = std::env::args().skip(1);
    let total: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(DEFAULT_TOTAL);
    let tmp = tempfile::TempDir::new().expect("tempdir");
    let dir =
        args.next().filter(|d| !d.is_empty()).map(PathBuf::from).unwrap_or_else(|| tmp.path().to_path_buf());
    let filter = args.next().unwrap_or_default();
    std::fs::create_dir_all(&dir).expect("dir");
    println!(
        "overdue-sql sqlite throughput: {total} timers per scenario, {} CPUs, db in {}",
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        dir.display()
    );

    let orders = |durability, tasks, batch| Scenario { durability, tasks, batch, due: Due::Orders };
    for durability in [Durability::Full, Durability::Normal] {
        for (tasks, batch) in [(8, 1), (8, 100), (1_000, 1)] {
            run_schedule(&dir, total, orders(durability, tasks, batch), &filter).await;
        }
    }
    let random = Scenario { durability: Durability::Full, tasks: 8, batch: 100, due: Due::Random };
    run_schedule(&dir, total, random, &filter).await;
    for durability in [Durability::Full, Durability::Normal] {
        run_claim(&dir, total, orders(durability, 8, 100), false, &filter).await;
    }
    run_claim(&dir, total, random, false, &filter).await;
    run_claim(&dir, total, orders(Durability::Full, 1, 100), true, &filter).await;
}
