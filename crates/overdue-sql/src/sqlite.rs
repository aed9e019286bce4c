//! [`SqliteStore`]: the embedded store, one SQLite file in WAL mode, for one process.
//!
//! ## What it guarantees
//!
//! - **Durable on return.** Every write (`schedule`, `cancel`, `reschedule`, `claim`,
//!   `claim_due`, `settle`, `replay`, [`SqliteStore::write`]) returns only after the transaction
//!   that holds it has committed, at the configured [`Durability`].
//! - **Group commit.** One OS thread owns the only write connection. Writes are messages to it;
//!   it runs everything queued (up to [`MAX_MESSAGES_PER_COMMIT`] messages) in one transaction,
//!   each message in its own savepoint, and answers after the commit. Concurrent writers share one
//!   fsync; a failing message rolls back only itself. See the `writer` module notes.
//! - **Concurrent reads.** `get`, `list`, `counts`, `due_refs` and `dead_letters` run on a pool of
//!   read-only connections (WAL lets them read beside the writer) on tokio's blocking threads.
//! - **The claim contract** of [`overdue_core::store`], checked in SQL inside the write
//!   transaction: a claim applies only if the generation matches, `due_at <= now` and the lease is
//!   empty or expired. Generations come from one counter on the writer thread, stored in `meta` by
//!   every transaction that advanced it, so no generation is ever handed out twice, even across a
//!   cancel, a crash or a reopen.
//! - **One process.** An exclusive lock on `<path>.lock` (see the `lock` module) keeps other
//!   overdue processes out; because of it, [`SqliteStore::open`] clears every lease, so the
//!   in-flight timers of a crashed process fire again at once instead of after their lease.
//!
//! Dropping the last handle stops the checkpoint thread, lets the writer thread run every job
//! still queued, closes the connections and releases the lock. A write whose future is dropped still commits.
//!
//! ## Runtime
//!
//! [`SqliteStore::open`] and every read use `tokio::task::spawn_blocking`, so they must be called
//! inside a tokio runtime. Writes only need an executor to await a oneshot reply.

mod checkpoint;
mod lock;
mod prepared;
mod read;
mod schema;
mod writer;

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::Duration;

use async_trait::async_trait;
use overdue_core::{
    Capabilities, Claimed, DeadLetter, DeadLetterQuery, DueHistogram, Error, ListQuery, QueueCount, Result, Settlement,
    Store, Timer, TimerRef, TimerSpec,
};
use tokio::sync::oneshot;

pub use self::lock::lock_path;
use self::read::ReadPool;
use self::writer::{Job, Task, Writer};
pub use self::prepared::Stmt;
pub use self::writer::{MAX_MESSAGES_PER_COMMIT, MAX_ROWS_PER_COMMIT, WriteCtx};

/// The backend name in errors and capabilities.
pub(crate) const BACKEND: &str = "sqlite";

/// Default number of read-only connections.
pub const DEFAULT_READERS: usize = 4;
/// Default time [`SqliteStore::open`] waits for another process to release the database.
pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(10);
/// Default page cache limit per connection (the writer and each reader): 32 MiB. Pages are
/// allocated as used; with memory-mapped reads the readers rarely fill theirs.
pub const DEFAULT_CACHE_KIB: u32 = 32 * 1024;
/// Default memory-mapped I/O window per connection: 256 MiB (address space, not memory).
pub const DEFAULT_MMAP_BYTES: u64 = 256 * 1024 * 1024;
/// Default time a statement waits on SQLite's own file locks before failing with a transient
/// "database is locked" error. Only a foreign process (the `sqlite3` shell, a backup tool) can
/// hold them: the process lock keeps other overdue processes out, and the writer thread is the
/// store's only writer.
pub const DEFAULT_BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Default WAL size, in pages, that triggers an automatic checkpoint: 16,384 pages of 4 KiB
/// (64 MiB). Fewer, larger checkpoints than SQLite's default of 1,000 pages keep checkpoint work
/// off most commits.
pub const DEFAULT_WAL_AUTOCHECKPOINT_PAGES: u32 = 16_384;

/// What a returned write survives. Every level uses WAL; they differ in when SQLite calls
/// `fsync` (SQLite's `PRAGMA synchronous`).
///
/// | level | `synchronous` | process crash (`kill -9`, panic, OOM kill) | OS crash or power loss |
/// |---|---|---|---|
/// | [`Buffer`](Durability::Buffer) | `OFF` | survives | may lose recent writes **and may corrupt the file** |
/// | [`Normal`](Durability::Normal) | `NORMAL` | survives | may lose writes since the last checkpoint; file stays consistent |
/// | [`Full`](Durability::Full) | `FULL` | survives | survives |
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum Durability {
    /// `synchronous = OFF`: SQLite never calls `fsync`. A commit has handed the WAL frames to the
    /// OS with `write()` before `schedule` returns, so a **process** crash loses nothing: the
    /// kernel still writes the page cache out. An **OS crash or power loss** can lose any write
    /// not yet flushed by the kernel (typically the last ~30 s) and, because checkpoints are not
    /// synced either, can leave the database file corrupt. For tests, demos and data you can
    /// rebuild.
    Buffer,
    /// `synchronous = NORMAL`: commits are not synced, but the WAL is synced before every
    /// checkpoint and the database file after it. A **process** crash loses nothing. An **OS
    /// crash or power loss** can roll back the most recent commits (those since the last
    /// checkpoint), but the database stays consistent and every earlier commit survives.
    Normal,
    /// `synchronous = FULL` (the default): every commit `fsync`s the WAL before `schedule`
    /// returns. Survives a **process** crash and an **OS crash or power loss**, as far as the
    /// disk honours `fsync`. Group commit shares one `fsync` among all writes queued together.
    #[default]
    Full,
}

impl std::str::FromStr for Durability {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s.to_ascii_lowercase().as_str() {
            "buffer" | "off" => Ok(Durability::Buffer),
            "normal" => Ok(Durability::Normal),
            "full" => Ok(Durability::Full),
            _ => Err(Error::Config(format!(
                "unknown sqlite durability {s:?}: expected buffer, normal or full"
            ))),
        }
    }
}

/// How to open a [`SqliteStore`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SqliteOptions {
    /// When a write counts as done. Default [`Durability::Full`].
    pub durability: Durability,
    /// Read-only connections for `get`, `list`, `counts`, `due_refs` and `dead_letters`; also
    /// the number of reads that run at once. Default [`DEFAULT_READERS`]; 0 means 1.
    pub readers: usize,
    /// How long `open` waits for another process to release the database before failing.
    /// Default [`DEFAULT_LOCK_TIMEOUT`].
    pub lock_timeout: Duration,
    /// How long a statement waits for a foreign process's SQLite lock before failing with a
    /// transient error. Default [`DEFAULT_BUSY_TIMEOUT`].
    pub busy_timeout: Duration,
    /// Page cache limit per connection (writer and each reader), in KiB.
    /// Default [`DEFAULT_CACHE_KIB`].
    pub cache_kib: u32,
    /// Memory-mapped read window per connection, in bytes; 0 disables it.
    /// Default [`DEFAULT_MMAP_BYTES`].
    pub mmap_bytes: u64,
    /// WAL pages that trigger a checkpoint. Default [`DEFAULT_WAL_AUTOCHECKPOINT_PAGES`].
    pub wal_autocheckpoint_pages: u32,
    /// Record a notice in the outbox with every upsert, for an external trigger's relay (see
    /// `overdue_core::trigger`). Default off: the in-process triggers need no outbox. URL:
    /// `?outbox=true`.
    pub outbox: bool,
}

impl Default for SqliteOptions {
    fn default() -> Self {
        SqliteOptions {
            durability: Durability::default(),
            readers: DEFAULT_READERS,
            lock_timeout: DEFAULT_LOCK_TIMEOUT,
            busy_timeout: DEFAULT_BUSY_TIMEOUT,
            cache_kib: DEFAULT_CACHE_KIB,
            mmap_bytes: DEFAULT_MMAP_BYTES,
            wal_autocheckpoint_pages: DEFAULT_WAL_AUTOCHECKPOINT_PAGES,
            outbox: false,
        }
    }
}

impl SqliteOptions {
    /// Options with the given durability and every other field at its default.
    pub fn with_durability(durability: Durability) -> Self {
        SqliteOptions { durability, ..SqliteOptions::default() }
    }
}

/// Parses `sqlite:PATH` or `sqlite://PATH`, with optional query parameters `durability`
/// (`buffer|normal|full`), `readers` (a count) and `lock_timeout_ms`.
///
/// `sqlite:data/overdue.db` and `sqlite://data/overdue.db` are relative paths,
/// `sqlite:///var/lib/overdue.db` is absolute. There is no percent-decoding: the path is taken
/// as written. In-memory databases are refused (the writer and the readers need one file).
pub fn parse_url(url: &str) -> Result<(PathBuf, SqliteOptions)> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:")).ok_or_else(|| {
        Error::Config(format!(
            "unsupported store url {url:?}: the sqlite store expects sqlite:PATH or sqlite://PATH"
        ))
    })?;
    let (path, query) = match rest.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (rest, None),
    };
    if path.is_empty() {
        return Err(Error::Config(format!("store url {url:?} has no database path")));
    }
    if path == ":memory:" || path.starts_with("file::memory:") {
        return Err(Error::Config(format!(
            "store url {url:?}: in-memory sqlite databases are not supported; give a file path"
        )));
    }
    let mut opts = SqliteOptions::default();
    for pair in query.into_iter().flat_map(|q| q.split('&')).filter(|p| !p.is_empty()) {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        let bad = |what: &str| Error::Config(format!("store url {url:?}: {name}={value:?} is not {what}"));
        match name {
            "durability" => opts.durability = value.parse()?,
            "readers" => opts.readers = value.parse().map_err(|_| bad("a count"))?,
            "outbox" => {
                opts.outbox = match value {
                    "true" | "1" | "on" => true,
                    "false" | "0" | "off" => false,
                    _ => return Err(bad("true or false")),
                }
            }
            "lock_timeout_ms" => {
                opts.lock_timeout =
                    Duration::from_millis(value.parse().map_err(|_| bad("a number of milliseconds"))?)
            }
            _ => {
                return Err(Error::Config(format!(
                    "store url {url:?}: unknown parameter {name:?} (known: durability, readers, lock_timeout_ms, outbox)"
                )));
            }
        }
    }
    Ok((PathBuf::from(path), opts))
}

/// Counters of the writer thread, for monitoring and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SqliteStats {
    /// Write messages submitted to the writer thread.
    pub messages: u64,
    /// Messages submitted but not yet taken by the writer (queue depth).
    pub queued: u64,
    /// Group transactions committed.
    pub commits: u64,
    /// Group transactions that failed as a whole (every message in them got the error).
    pub failed_commits: u64,
    /// Messages that failed on their own and were rolled back to their savepoint.
    pub rolled_back: u64,
    /// Most messages committed in one transaction.
    pub largest_batch: u64,
}

/// Shared atomic counters behind [`SqliteStats`].
#[derive(Debug, Default)]
pub(crate) struct Stats {
    submitted: AtomicU64,
    dequeued: AtomicU64,
    commits: AtomicU64,
    failed_commits: AtomicU64,
    rolled_back: AtomicU64,
    largest_batch: AtomicU64,
}

/// The embedded SQLite store. Cheap to clone; all clones share one writer thread, one read pool
/// and one process lock, released when the last clone is dropped.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    opts: SqliteOptions,
    tx: Option<mpsc::Sender<Box<dyn Job>>>,
    writer: Option<JoinHandle<()>>,
    readers: Arc<ReadPool>,
    stats: Arc<Stats>,
    /// Stopped (joined) before the writer releases the process lock.
    checkpointer: Option<checkpoint::Checkpointer>,
}

impl fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .field("durability", &self.inner.opts.durability)
            .field("stats", &self.stats())
            .finish()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.readers.close();
        drop(self.checkpointer.take());
        // Closing the channel ends the writer loop once it has run every job still queued.
        drop(self.tx.take());
        if let Some(handle) = self.writer.take() {
            // The last handle can be dropped on the writer thread itself (inside a write
            // closure that owned a clone); it exits on its own then, and joining would deadlock.
            if handle.thread().id() != std::thread::current().id() && handle.join().is_err() {
                tracing::error!(db = %self.path.display(), "the sqlite writer thread panicked");
            }
        }
    }
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`: creates the parent directory, takes
    /// the process lock (waiting up to `opts.lock_timeout`), applies schema migrations, clears
    /// leases left by a previous process and starts the writer thread.
    ///
    /// Async: the blocking work runs on tokio's blocking pool. Fails with a clear error if
    /// another process holds the database, if its schema is newer than this build, or if the
    /// path is a directory.
    pub async fn open(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        tokio::task::spawn_blocking(move || SqliteStore::open_blocking(path, opts)).await.map_err(|e| {
            Error::Store {
                backend: BACKEND,
                message: format!("opening the sqlite store failed: {e}"),
                transient: false,
                source: Some(Box::new(e)),
            }
        })?
    }

    /// Opens the database a `sqlite:PATH` / `sqlite://PATH` URL names; see [`parse_url`] for
    /// the accepted query parameters.
    pub async fn open_url(url: &str) -> Result<SqliteStore> {
        let (path, opts) = parse_url(url)?;
        SqliteStore::open(path, opts).await
    }

    /// [`SqliteStore::open`] for code outside an async context. Blocks for up to
    /// `opts.lock_timeout` if another process holds the database.
    pub fn open_blocking(path: impl AsRef<Path>, opts: SqliteOptions) -> Result<SqliteStore> {
        let path = path.as_ref().to_path_buf();
        if path.is_dir() {
            return Err(Error::Config(format!(
                "sqlite path {} is a directory; give a file path such as {}",
                path.display(),
                path.join("overdue.db").display()
            )));
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(|e| {
                Error::store(BACKEND, format!("cannot create directory {}: {e}", parent.display()), false, e)
            })?;
        }
        let lock = lock::acquire(&path, opts.lock_timeout)?;
        let mut conn = schema::open_writer(&path, &opts)?;
        let found = schema::migrate(&mut conn, &path)?;
        let (generation, cleared) = schema::recover(&mut conn)?;
        let readers = Arc::new(ReadPool::open(path.clone(), opts.clone())?);
        let checkpointer = checkpoint::Checkpointer::start(&path, &opts)?;
        tracing::info!(
            db = %path.display(),
            lock = %lock.path().display(),
            schema = found,
            generation,
            leases_cleared = cleared,
            durability = ?opts.durability,
            "opened sqlite store"
        );

        let stats = Arc::new(Stats::default());
        let (tx, rx) = mpsc::channel();
        let writer =
            Writer { conn, generation, persisted: generation, rx, stats: Arc::clone(&stats), lock, outbox: opts.outbox };
        let handle = std::thread::Builder::new()
            .name("overdue-sqlite-writer".to_owned())
            .spawn(move || writer.run())
            .map_err(|e| Error::store(BACKEND, format!("cannot start the writer thread: {e}"), false, e))?;
        Ok(SqliteStore {
            inner: Arc::new(Inner { path, opts, tx: Some(tx), writer: Some(handle), readers, stats, checkpointer: Some(checkpointer) }),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// The options the store was opened with.
    pub fn options(&self) -> &SqliteOptions {
        &self.inner.opts
    }

    /// Writer counters: messages, commits, rollbacks, queue depth.
    pub fn stats(&self) -> SqliteStats {
        let s = &self.inner.stats;
        let messages = s.submitted.load(Ordering::Relaxed);
        SqliteStats {
            messages,
            queued: messages.saturating_sub(s.dequeued.load(Ordering::Relaxed)),
            commits: s.commits.load(Ordering::Relaxed),
            failed_commits: s.failed_commits.load(Ordering::Relaxed),
            rolled_back: s.rolled_back.load(Ordering::Relaxed),
            largest_batch: s.largest_batch.load(Ordering::Relaxed),
        }
    }

    /// Runs `f` on the writer thread inside its own savepoint of the current group-commit
    /// transaction, and returns its result after that transaction committed.
    ///
    /// `f` gets the write connection for its own SQL and the timer operations
    /// ([`WriteCtx::schedule`], [`WriteCtx::cancel`], [`WriteCtx::reschedule`]) that share the
    /// store's generation counter, so "insert the order and schedule its close timer" is one
    /// atomic, durable step. If `f` returns `Err` (or panics), only its own savepoint is rolled
    /// back; the other writes of the group commit. Keep `f` short: the whole group waits for it.
    pub async fn write<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.submit(1, false, f).await
    }

    /// [`SqliteStore::write`] for a closure that returns `Err` only before its first change (a
    /// domain check that fails on the first conditional `UPDATE`, say) or on a store error:
    /// it runs without a savepoint of its own (unless the store's outbox is on), which saves two
    /// statements and the copy of every page it touches into the savepoint journal. If it does return `Err` after it changed rows
    /// (counted by `total_changes`: `INSERT`, `UPDATE`, `DELETE`), its writes cannot be undone
    /// alone, so the writer rolls back the whole group transaction and every write of the group
    /// fails with that error (the closure's own error for itself) — nothing half-done commits.
    pub async fn write_without_savepoint<T, F>(&self, f: F) -> Result<T>
    where
        F: FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        self.submit(1, true, f).await
    }

    /// Sends a job to the writer and waits for its committed result. `one_statement` must only be
    /// set for closures that run exactly one SQL statement (they skip the savepoint).
    async fn submit<T, F>(&self, weight: usize, one_statement: bool, f: F) -> Result<T>
    where
        F: FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send + 'static,
        T: Send + 'static,
    {
        // With the outbox on, an upsert is two statements (the timer and its notice): they
        // need the savepoint that keeps a job all-or-nothing inside its group.
        let one_statement = one_statement && !self.inner.opts.outbox;
        let (reply, rx) = oneshot::channel();
        let sender = self.inner.tx.as_ref().ok_or_else(writer_stopped)?;
        self.inner.stats.submitted.fetch_add(1, Ordering::Relaxed);
        sender.send(Box::new(Task::new(weight, one_statement, f, reply))).map_err(|_| writer_stopped())?;
        rx.await.map_err(|_| writer_stopped())?
    }
}

fn writer_stopped() -> Error {
    Error::Store {
        backend: BACKEND,
        message: "the sqlite writer thread has stopped; reopen the store".to_owned(),
        transient: false,
        source: None,
    }
}

/// True for errors that may go away on retry: the database was busy or locked.
pub(crate) fn is_transient(e: &rusqlite::Error) -> bool {
    matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    )
}

/// An overdue store error for a failed SQLite call, with the rusqlite error as its source.
pub fn sql_error(context: &str, e: rusqlite::Error) -> Error {
    Error::store(BACKEND, format!("{context}: {e}"), is_transient(&e), e)
}

/// `.store_err("what")` on rusqlite results, for code inside [`SqliteStore::write`] closures.
pub trait SqlResultExt<T> {
    /// Maps a rusqlite error to [`overdue_core::Error::Store`] (backend `sqlite`, transient for
    /// `SQLITE_BUSY`/`SQLITE_LOCKED`), prefixing the message with `context`.
    fn store_err(self, context: &str) -> Result<T>;
}

impl<T> SqlResultExt<T> for rusqlite::Result<T> {
    fn store_err(self, context: &str) -> Result<T> {
        self.map_err(|e| sql_error(context, e))
    }
}

/// A stored generation (never negative) as the API's `u64`.
pub(crate) fn gen_out(generation: i64) -> u64 {
    u64::try_from(generation).unwrap_or(0)
}

#[async_trait]
impl Store for SqliteStore {
    fn capabilities(&self) -> Capabilities {
        // Every durability level survives a process crash; see `Durability` for power loss.
        Capabilities { name: BACKEND, durable: true, shared: false }
    }

    async fn schedule(&self, timers: Vec<TimerSpec>, now: i64) -> Result<Vec<u64>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        self.submit(timers.len(), timers.len() == 1, move |ctx| ctx.upsert_all(&timers, now)).await
    }

    async fn cancel(&self, queue: &str, key: &str) -> Result<Option<u64>> {
        let (queue, key) = (queue.to_owned(), key.to_owned());
        self.submit(1, true, move |ctx| ctx.cancel(&queue, &key)).await
    }

    async fn reschedule(&self, queue: &str, key: &str, due_at: i64, now: i64) -> Result<Option<u64>> {
        let (queue, key) = (queue.to_owned(), key.to_owned());
        self.submit(1, true, move |ctx| ctx.reschedule(&queue, &key, due_at, now)).await
    }

    async fn get(&self, queue: &str, key: &str, now: i64) -> Result<Option<Timer>> {
        let (queue, key) = (queue.to_owned(), key.to_owned());
        self.inner.readers.read(move |conn| read::get(conn, &queue, &key, now)).await
    }

    async fn list(&self, query: &ListQuery, now: i64) -> Result<Vec<Timer>> {
        let query = query.clone();
        self.inner.readers.read(move |conn| read::list(conn, &query, now)).await
    }

    async fn counts(&self, now: i64) -> Result<Vec<QueueCount>> {
        self.inner.readers.read(move |conn| read::counts(conn, now)).await
    }

    async fn due_histogram(&self, now: i64) -> Result<DueHistogram> {
        self.inner.readers.read(move |conn| read::due_histogram(conn, now)).await
    }

    async fn due_refs(
        &self,
        after: Option<&(i64, String, String)>,
        until: i64,
        limit: u32,
    ) -> Result<Vec<TimerRef>> {
        let after = after.cloned();
        self.inner.readers.read(move |conn| read::due_refs(conn, after.as_ref(), until, limit)).await
    }

    async fn claim(
        &self,
        timers: &[TimerRef],
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<Claimed>> {
        if timers.is_empty() {
            return Ok(Vec::new());
        }
        let (timers, owner) = (timers.to_vec(), owner.to_owned());
        self.submit(timers.len(), timers.len() == 1, move |ctx| ctx.claim(&timers, &owner, now, lease_until))
            .await
    }

    async fn claim_due(
        &self,
        now: i64,
        due_before: i64,
        limit: u32,
        owner: &str,
        lease_until: i64,
    ) -> Result<Vec<Claimed>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let owner = owner.to_owned();
        let weight = usize::try_from(limit).unwrap_or(usize::MAX);
        self.submit(weight, true, move |ctx| ctx.claim_due(now, due_before, limit, &owner, lease_until)).await
    }

    async fn settle(&self, batch: Vec<Settlement>, now: i64) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        // A dead letter is two statements (copy, then delete).
        let one_statement = batch.len() == 1 && !matches!(batch[0], Settlement::DeadLetter { .. });
        self.submit(batch.len(), one_statement, move |ctx| ctx.settle(&batch, now)).await
    }

    async fn dead_letters(&self, query: &DeadLetterQuery) -> Result<Vec<DeadLetter>> {
        let query = query.clone();
        self.inner.readers.read(move |conn| read::dead_letters(conn, &query)).await
    }

    async fn replay(&self, id: i64, due_at: i64, now: i64) -> Result<Option<u64>> {
        self.submit(1, false, move |ctx| ctx.replay(id, due_at, now)).await
    }

    async fn outbox_fetch(&self, limit: u32) -> Result<Vec<(i64, TimerRef)>> {
        self.require_outbox()?;
        self.inner
            .readers
            .read(move |conn| {
                let mut stmt = conn.prepare_cached(writer::OUTBOX_SELECT).store_err("outbox fetch")?;
                let rows = stmt
                    .query_map([limit], |row| {
                        Ok((
                            row.get::<_, i64>(0)?,
                            TimerRef {
                                queue: row.get(1)?,
                                key: row.get(2)?,
                                generation: gen_out(row.get(3)?),
                                due_at: row.get(4)?,
                            },
                        ))
                    })
                    .store_err("outbox fetch")?;
                rows.collect::<rusqlite::Result<Vec<_>>>().store_err("outbox fetch")
            })
            .await
    }

    async fn outbox_ack(&self, seqs: &[i64]) -> Result<()> {
        self.require_outbox()?;
        if seqs.is_empty() {
            return Ok(());
        }
        let seqs = seqs.to_vec();
        self.submit(seqs.len(), false, move |ctx| ctx.outbox_ack(&seqs)).await
    }
}

impl SqliteStore {
    fn require_outbox(&self) -> Result<()> {
        if self.inner.opts.outbox {
            Ok(())
        } else {
            Err(Error::Config(format!(
                "the sqlite store at {} was opened without its outbox; an external trigger needs \
                 SqliteOptions {{ outbox: true, .. }} (URL parameter outbox=true)",
                self.inner.path.display()
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_path_and_options() {
        let (path, opts) = parse_url("sqlite:data/overdue.db").expect("plain");
        assert_eq!(path, PathBuf::from("data/overdue.db"));
        assert_eq!(opts, SqliteOptions::default());

        let (path, _) = parse_url("sqlite:///var/lib/overdue.db").expect("absolute");
        assert_eq!(path, PathBuf::from("/var/lib/overdue.db"));
        let (path, _) = parse_url("sqlite://rel/x.db").expect("relative");
        assert_eq!(path, PathBuf::from("rel/x.db"));

        let (_, opts) =
            parse_url("sqlite:x.db?durability=normal&readers=2&lock_timeout_ms=250").expect("params");
        assert_eq!(opts.durability, Durability::Normal);
        assert_eq!(opts.readers, 2);
        assert_eq!(opts.lock_timeout, Duration::from_millis(250));
    }

    #[test]
    fn bad_urls_say_what_is_wrong() {
        for (url, needle) in [
            ("postgres://localhost/db", "expects sqlite:PATH"),
            ("overdue.db", "expects sqlite:PATH"),
            ("sqlite:", "no database path"),
            ("sqlite://", "no database path"),
            ("sqlite::memory:", "in-memory"),
            ("sqlite:x.db?durability=fast", "unknown sqlite durability"),
            ("sqlite:x.db?readers=many", "readers"),
            ("sqlite:x.db?mode=rwc", "unknown parameter"),
        ] {
            let err = parse_url(url).expect_err(url);
            assert!(matches!(err, Error::Config(_)), "{url}: {err:?}");
            assert!(err.to_string().contains(needle), "{url}: {err}");
        }
    }

    #[test]
    fn durability_parses_its_names() {
        assert_eq!("FULL".parse::<Durability>().expect("full"), Durability::Full);
        assert_eq!("off".parse::<Durability>().expect("off"), Durability::Buffer);
        assert_eq!(Durability::default(), Durability::Full);
    }

    #[test]
    fn busy_and_locked_are_transient_and_other_failures_are_not() {
        let failure = |code| rusqlite::Error::SqliteFailure(rusqlite::ffi::Error::new(code), None);
        for code in [rusqlite::ffi::SQLITE_BUSY, rusqlite::ffi::SQLITE_LOCKED] {
            let err = sql_error("schedule", failure(code));
            assert!(err.is_transient(), "{err}");
            assert!(matches!(err, Error::Store { backend: "sqlite", source: Some(_), .. }));
        }
        for code in [rusqlite::ffi::SQLITE_FULL, rusqlite::ffi::SQLITE_CORRUPT, rusqlite::ffi::SQLITE_IOERR] {
            assert!(!sql_error("schedule", failure(code)).is_transient());
        }
    }

    #[test]
    fn lock_file_sits_next_to_the_database() {
        assert_eq!(lock_path(Path::new("/d/overdue.db")), PathBuf::from("/d/overdue.db.lock"));
    }
}
