//! The background checkpointer.
//!
//! In WAL mode SQLite must now and then copy the WAL back into the database file (a
//! *checkpoint*). By default the connection whose commit crosses `wal_autocheckpoint` does it,
//! inside that commit — here the single writer thread — so every schedule, claim and settle
//! queued behind it waits for a copy of up to 64 MiB plus its `fsync`: that was the p99 of firing
//! lateness. This thread runs a `PASSIVE` checkpoint on its own connection instead, every
//! [`CHECKPOINT_PERIOD`], so the WAL never grows far past what one period writes. A passive
//! checkpoint takes no write lock, so the writer keeps committing while it runs. The writer's own
//! `wal_autocheckpoint` stays as a backstop for a WAL that outgrows this thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use overdue_core::{Error, Result};
use rusqlite::{Connection, OpenFlags};

use super::{BACKEND, SqlResultExt, SqliteOptions};

/// How often the checkpointer looks at the WAL.
pub(crate) const CHECKPOINT_PERIOD: Duration = Duration::from_millis(100);

/// A running checkpointer; stopped and joined on drop.
#[derive(Debug)]
pub(crate) struct Checkpointer {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Checkpointer {
    /// Starts the thread with its own read-write connection to `path`.
    pub(crate) fn start(path: &Path, opts: &SqliteOptions) -> Result<Checkpointer> {
        let conn = open(path, opts)?;
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let db: PathBuf = path.to_path_buf();
        let thread = std::thread::Builder::new()
            .name("overdue-sqlite-checkpoint".to_owned())
            .spawn(move || run(conn, flag, db))
            .map_err(|e| Error::store(BACKEND, format!("cannot start the checkpoint thread: {e}"), false, e))?;
        Ok(Checkpointer { stop, thread: Some(thread) })
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            if t.join().is_err() {
                tracing::error!("the sqlite checkpoint thread panicked");
            }
        }
    }
}

fn open(path: &Path, opts: &SqliteOptions) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .map_err(|e| super::sql_error(&format!("cannot open database {} for checkpoints", path.display()), e))?;
    conn.busy_timeout(Duration::from_millis(50)).store_err("set busy timeout")?;
    // Checkpoint fsyncs follow the connection's own setting: match the writer's durability.
    conn.pragma_update(None, "synchronous", opts.durability.synchronous()).store_err("set synchronous")?;
    // This connection never checkpoints on commit (it never commits).
    conn.pragma_update(None, "wal_autocheckpoint", 0).store_err("set wal_autocheckpoint")?;
    Ok(conn)
}

fn run(conn: Connection, stop: Arc<AtomicBool>, db: PathBuf) {
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(CHECKPOINT_PERIOD);
        if stop.load(Ordering::Relaxed) {
            break;
        }
        // With nothing new in the WAL this only reads the WAL index: cheap enough to run every
        // period. It copies what no reader still needs and never blocks the writer.
        if let Err(e) = conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(())) {
            tracing::debug!(db = %db.display(), error = %e, "passive checkpoint skipped");
        }
    }
}
