//! `kill -9` of a process that holds the store: every `schedule` that returned survives at every
//! durability level, the OS releases the process lock, and the dead process's claims fire again
//! at once after reopening.
//!
//! The test binary re-runs itself as the child: `child_process_body` does nothing unless
//! [`CHILD_DB`] is set.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::Duration;

use overdue_core::{QueueCount, Store, TimerSpec};
use overdue_sql::{Durability, SqliteOptions, SqliteStore};
use tempfile::TempDir;

const CHILD_DB: &str = "OVERDUE_SQL_CRASH_CHILD_DB";
const CHILD_DURABILITY: &str = "OVERDUE_SQL_CRASH_CHILD_DURABILITY";
const READY: &str = "CHILD-READY";
const T0: i64 = 1_700_000_000_000;
const TIMERS: usize = 500;
const CLAIMED: usize = 20;

/// The child: schedules, claims some with an hour-long lease, says so, then waits to be killed.
#[test]
fn child_process_body() {
    let Ok(path) = std::env::var(CHILD_DB) else { return };
    let durability: Durability = std::env::var(CHILD_DURABILITY).expect("durability").parse().expect("valid");
    let rt =
        tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    rt.block_on(async {
        let store =
            SqliteStore::open(&path, SqliteOptions::with_durability(durability)).await.expect("child open");
        // Many small concurrent schedules, so that several group commits are involved.
        let tasks: Vec<_> = (0..TIMERS)
            .map(|i| {
                let store = store.clone();
                tokio::spawn(async move {
                    store.schedule(vec![TimerSpec::new("q", format!("k{i:04}"), T0 + i as i64)], T0).await
                })
            })
            .collect();
        for t in tasks {
            t.await.expect("task").expect("schedule");
        }
        let claimed = store.claim_due(T0 + 1_000, T0 + 1_000, CLAIMED as u32, "doomed", T0 + 3_600_000).await;
        assert_eq!(claimed.expect("claim").len(), CLAIMED);
        // libtest may print "test child_process_body ... " on the same line first.
        println!("{READY}");
        // Keep the store (and its lock) open until killed.
        std::thread::sleep(Duration::from_secs(600));
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_keeps_returned_schedules_and_frees_the_lock() {
    for durability in ["buffer", "normal", "full"] {
        let dir = TempDir::new().expect("tempdir");
        let path = dir.path().join("overdue.db");
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args(["--exact", "child_process_body", "--nocapture", "--test-threads=1"])
            .env(CHILD_DB, &path)
            .env(CHILD_DURABILITY, durability)
            .stdout(Stdio::piped())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let ready = tokio::task::spawn_blocking(move || {
            BufReader::new(stdout).lines().map_while(Result::ok).any(|line| line.contains(READY))
        })
        .await
        .expect("reader");
        assert!(ready, "{durability}: the child never became ready");
        child.kill().expect("SIGKILL"); // SIGKILL on Unix: no destructors, no clean close.
        child.wait().expect("reap");

        let opts = SqliteOptions { lock_timeout: Duration::from_secs(2), ..SqliteOptions::default() };
        let store = SqliteStore::open(&path, opts).await.expect("the dead child's lock is gone");
        let counts = store.counts(T0 + 1_000).await.expect("counts");
        assert_eq!(
            counts,
            vec![QueueCount { queue: "q".into(), pending: TIMERS as u64, in_flight: 0, dead: 0 }],
            "{durability}: every returned schedule survives kill -9 and no lease survives the reopen"
        );
        let refired =
            store.claim_due(T0 + 1_000, T0 + 1_000, 1_000, "heir", T0 + 60_000).await.expect("claim");
        assert!(refired.len() > CLAIMED, "{durability}: the dead process's claims fire at once");
    }
}
