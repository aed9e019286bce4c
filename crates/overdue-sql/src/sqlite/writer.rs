//! The writer thread: one OS thread owns the only write connection and commits in groups.
//!
//! ## Ground rules
//!
//! - Every write is a [`Job`] sent over an unbounded channel. The thread blocks for the first job,
//!   then drains whatever else is queued, up to [`MAX_MESSAGES_PER_COMMIT`] jobs or
//!   [`MAX_ROWS_PER_COMMIT`] timers, and runs them all in **one** `BEGIN IMMEDIATE … COMMIT`.
//!   While it waits for one commit's fsync, the next group queues up, so concurrent writers share
//!   fsyncs without any timer or delay: a lone write commits at once.
//! - Each job runs inside its own `SAVEPOINT`. A job that fails (or panics) is rolled back to its
//!   savepoint and released; the other jobs of the group are unaffected. The exceptions run
//!   without the savepoint's extra statements and page copies (every page a savepoint's job
//!   touches is first copied into the savepoint journal): a job of exactly one SQL statement (a
//!   one-timer schedule, a cancel, …), which SQLite undoes by itself when it fails, and a
//!   [`SqliteStore::write_without_savepoint`](super::SqliteStore::write_without_savepoint)
//!   closure, which promises to fail only before its first change. The writer checks that
//!   promise: a savepoint-less job that fails after it changed rows (`total_changes` moved) cannot
//!   be undone alone, so the whole group is rolled back and every job of it receives the error.
//! - No job learns its outcome before the `COMMIT` returned: replies are sent after it, so an `Ok`
//!   means durable at the configured [`Durability`](super::Durability). If the commit itself fails,
//!   every job of the group receives the error.
//! - The generation counter lives here and only here. It is the largest generation ever handed
//!   out; it only grows (a rolled-back job's generations are skipped, never reused) and is written
//!   to `meta` by every transaction that advanced it, outside the job savepoints, so that what is
//!   durable never lags what a caller has seen.
//! - The thread exits when every sender is gone (the store was dropped). It then closes the
//!   connection and only afterwards releases the process lock.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;

use overdue_core::{Claimed, Error, Result, Settlement, TimerRef, TimerSpec};
use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::oneshot;

use super::lock::ProcessLock;
use super::prepared::{Prepared, Stmt};
use super::{BACKEND, SqlResultExt, Stats, gen_out, sql_error};
use crate::dialect::{Dialect, Queries};

/// Most jobs (messages) one group commit takes from the queue.
pub const MAX_MESSAGES_PER_COMMIT: usize = 4096;
/// Most timers one group commit writes before it stops draining the queue; bounds the WAL growth
/// and the latency of a single commit.
pub const MAX_ROWS_PER_COMMIT: usize = 65_536;

const Q: &Queries = Dialect::Sqlite.queries();

/// A unit of work for the writer thread.
pub(crate) trait Job: Send {
    /// How many timers the job touches, for [`MAX_ROWS_PER_COMMIT`].
    fn weight(&self) -> usize;
    /// Whether the job needs a savepoint of its own. A job that runs exactly one SQL statement
    /// does not: SQLite undoes a failed statement by itself, so the job is all-or-nothing
    /// anyway, and skipping the savepoint saves two statements and a copy of every page it
    /// touches into the savepoint journal. Nor does a job that fails only before its first
    /// change (the writer rolls back the whole group if such a job fails after changing rows).
    fn needs_savepoint(&self) -> bool;
    /// Runs the job inside its savepoint. Returns `false` if it failed and must be rolled back.
    fn run(&mut self, ctx: &mut WriteCtx<'_, '_>) -> bool;
    /// Sends the outcome: the job's own result if the transaction committed (`None`), else the
    /// transaction's failure (a job's own error wins over it).
    fn finish(self: Box<Self>, failure: Option<&TxFailure>);
}

/// A closure and the channel its result goes back on.
pub(crate) struct Task<T, F> {
    f: Option<F>,
    out: Option<Result<T>>,
    reply: oneshot::Sender<Result<T>>,
    weight: usize,
    one_statement: bool,
}

impl<T, F> Task<T, F> {
    /// A job touching `weight` timers; `one_statement` promises that `f` runs exactly one SQL
    /// statement (see [`Job::needs_savepoint`]).
    pub(crate) fn new(weight: usize, one_statement: bool, f: F, reply: oneshot::Sender<Result<T>>) -> Self {
        Task { f: Some(f), out: None, reply, weight: weight.max(1), one_statement }
    }
}

impl<T, F> Job for Task<T, F>
where
    T: Send,
    F: FnOnce(&mut WriteCtx<'_, '_>) -> Result<T> + Send,
{
    fn weight(&self) -> usize {
        self.weight
    }

    fn needs_savepoint(&self) -> bool {
        !self.one_statement
    }

    fn run(&mut self, ctx: &mut WriteCtx<'_, '_>) -> bool {
        let Some(f) = self.f.take() else { return false };
        let out = match catch_unwind(AssertUnwindSafe(|| f(ctx))) {
            Ok(out) => out,
            Err(panic) => Err(Error::Store {
                backend: BACKEND,
                message: format!("write closure panicked: {}", panic_message(&*panic)),
                transient: false,
                source: None,
            }),
        };
        let ok = out.is_ok();
        self.out = Some(out);
        ok
    }

    fn finish(self: Box<Self>, failure: Option<&TxFailure>) {
        let result = match (self.out, failure) {
            (Some(Err(own)), _) => Err(own),
            (Some(Ok(value)), None) => Ok(value),
            (_, Some(failure)) => Err(failure.to_error()),
            (None, None) => Err(Error::Store {
                backend: BACKEND,
                message: "write job finished without running (bug)".to_owned(),
                transient: false,
                source: None,
            }),
        };
        // The caller may have stopped waiting; the write stands either way.
        let _ = self.reply.send(result);
    }
}

fn panic_message(panic: &(dyn Any + Send)) -> &str {
    if let Some(s) = panic.downcast_ref::<&str>() {
        s
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s
    } else {
        "non-string panic payload"
    }
}

/// Why a whole group transaction failed; handed to every job of the group.
#[derive(Debug)]
pub(crate) struct TxFailure {
    context: &'static str,
    code: Option<rusqlite::ffi::Error>,
    message: String,
    transient: bool,
}

impl TxFailure {
    fn from_sql(context: &'static str, e: &rusqlite::Error) -> Self {
        TxFailure {
            context,
            code: e.sqlite_error().copied(),
            message: e.to_string(),
            transient: super::is_transient(e),
        }
    }

    fn other(context: &'static str, message: impl Into<String>) -> Self {
        TxFailure { context, code: None, message: message.into(), transient: false }
    }

    /// A fresh error for one waiter; the rusqlite cause is rebuilt from its code.
    fn to_error(&self) -> Error {
        let message = format!("{}: {}", self.context, self.message);
        match self.code {
            Some(code) => Error::store(
                BACKEND,
                message,
                self.transient,
                rusqlite::Error::SqliteFailure(code, Some(self.message.clone())),
            ),
            None => Error::Store { backend: BACKEND, message, transient: self.transient, source: None },
        }
    }
}

/// Owns the write connection; runs on its own OS thread.
pub(crate) struct Writer {
    pub(crate) conn: Connection,
    /// Largest generation handed out.
    pub(crate) generation: i64,
    /// Largest generation known to be committed in `meta`.
    pub(crate) persisted: i64,
    pub(crate) rx: Receiver<Box<dyn Job>>,
    pub(crate) stats: Arc<Stats>,
    pub(crate) lock: ProcessLock,
    /// Record a notice in `timer_outbox` with every upsert (an external trigger relays them).
    pub(crate) outbox: bool,
}

impl Writer {
    /// The thread body: group-commit until every sender is gone.
    pub(crate) fn run(self) {
        let Writer { conn, generation, persisted, rx, stats, lock, outbox } = self;
        {
            // Dropped (its statements finalized) before the connection is closed.
            let prepared = Prepared::new(&conn);
            let mut group = Group { prepared: &prepared, generation, persisted, stats: &stats, outbox };
            while let Ok(first) = rx.recv() {
                let mut weight = first.weight();
                let mut batch = vec![first];
                while batch.len() < MAX_MESSAGES_PER_COMMIT && weight < MAX_ROWS_PER_COMMIT {
                    match rx.try_recv() {
                        Ok(job) => {
                            weight += job.weight();
                            batch.push(job);
                        }
                        Err(_) => break,
                    }
                }
                stats.dequeued.fetch_add(batch.len() as u64, Ordering::Relaxed);
                stats.largest_batch.fetch_max(batch.len() as u64, Ordering::Relaxed);
                let failure = group.commit_group(&mut batch).err();
                match &failure {
                    None => {
                        stats.commits.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(f) => {
                        stats.failed_commits.fetch_add(1, Ordering::Relaxed);
                        tracing::warn!(jobs = batch.len(), error = %f.message, "sqlite group commit failed");
                    }
                }
                for job in batch {
                    job.finish(failure.as_ref());
                }
            }
        }
        if let Err((_, e)) = conn.close() {
            tracing::warn!(error = %e, "closing the sqlite write connection failed");
        }
        drop(lock);
    }
}

/// The writer thread's state while it runs: the connection and its kept statements.
struct Group<'p, 'c> {
    prepared: &'p Prepared<'c>,
    /// Largest generation handed out.
    generation: i64,
    /// Largest generation known to be committed in `meta`.
    persisted: i64,
    stats: &'p Stats,
    outbox: bool,
}

impl Group<'_, '_> {
    fn exec(&self, sql: &'static str) -> rusqlite::Result<()> {
        self.prepared.exec(sql)
    }

    /// Runs one group in one transaction, each job in its own savepoint.
    fn commit_group(&mut self, batch: &mut [Box<dyn Job>]) -> std::result::Result<(), TxFailure> {
        self.exec("BEGIN IMMEDIATE").map_err(|e| TxFailure::from_sql("begin", &e))?;
        match self.run_jobs(batch) {
            Ok(()) => {}
            Err(f) => {
                self.rollback();
                return Err(f);
            }
        }
        if let Err(e) = self.exec("COMMIT") {
            self.rollback();
            return Err(TxFailure::from_sql("commit", &e));
        }
        self.persisted = self.generation;
        Ok(())
    }

    fn run_jobs(&mut self, batch: &mut [Box<dyn Job>]) -> std::result::Result<(), TxFailure> {
        for job in batch.iter_mut() {
            let savepoint = job.needs_savepoint();
            if savepoint {
                self.exec("SAVEPOINT overdue_job").map_err(|e| TxFailure::from_sql("savepoint", &e))?;
            }
            let changes_before = self.prepared.conn().total_changes();
            let ok = job.run(&mut WriteCtx {
                prepared: self.prepared,
                generation: &mut self.generation,
                outbox: self.outbox,
            });
            if self.prepared.conn().is_autocommit() {
                // SQLite rolled the whole transaction back (I/O error, disk full, …) or a write
                // closure ended it. Nothing of this group can be trusted to commit.
                return Err(TxFailure::other(
                    "group commit",
                    "the transaction ended inside a job (an I/O error, or a write closure ran \
                     COMMIT/ROLLBACK); every write of this group was abandoned",
                ));
            }
            if !ok {
                self.stats.rolled_back.fetch_add(1, Ordering::Relaxed);
                if !savepoint && self.prepared.conn().total_changes() != changes_before {
                    // Its writes cannot be undone alone: nothing of this group may commit.
                    return Err(TxFailure::other(
                        "group commit",
                        "a write without a savepoint of its own failed after changing rows; every \
                         write of this group was rolled back",
                    ));
                }
            }
            if savepoint {
                if !ok {
                    self.exec("ROLLBACK TO overdue_job").map_err(|e| TxFailure::from_sql("rollback to savepoint", &e))?;
                }
                self.exec("RELEASE overdue_job").map_err(|e| TxFailure::from_sql("release savepoint", &e))?;
            }
        }
        if self.generation > self.persisted {
            self.prepared
                .get(Q.store_generation)
                .and_then(|mut s| s.execute([self.generation]))
                .map_err(|e| TxFailure::from_sql("store generation", &e))?;
        }
        Ok(())
    }

    fn rollback(&self) {
        if !self.prepared.conn().is_autocommit()
            && let Err(e) = self.exec("ROLLBACK")
        {
            tracing::warn!(error = %e, "sqlite rollback failed");
        }
    }
}

/// Converts an API generation to the stored integer; `None` if it cannot be stored (and so
/// cannot match anything).
fn gen_in(generation: u64) -> Option<i64> {
    i64::try_from(generation).ok()
}

fn attempts_out(attempts: i64) -> u32 {
    u32::try_from(attempts.max(0)).unwrap_or(u32::MAX)
}

/// `(queue, key)`: [`WriteCtx::remove`].
const DELETE_TIMER: &str = "DELETE FROM timers WHERE queue = ?1 AND key = ?2";
/// `(queue, key, generation, due_at)`: one notice for the external trigger's relay.
const OUTBOX_INSERT: &str = "INSERT INTO timer_outbox (queue, key, generation, due_at) VALUES (?1, ?2, ?3, ?4)";
/// `(seq)`.
const OUTBOX_DELETE: &str = "DELETE FROM timer_outbox WHERE seq = ?1";
/// `(limit)`: the oldest notices.
pub(crate) const OUTBOX_SELECT: &str =
    "SELECT seq, queue, key, generation, due_at FROM timer_outbox ORDER BY seq LIMIT ?1";

/// What a write closure gets: the write connection, inside the group-commit transaction and the
/// closure's own savepoint, and the timer operations that share the store's generation counter.
///
/// Use [`WriteCtx::connection`] for your own SQL (e.g. the order tables) and
/// [`WriteCtx::schedule`] / [`WriteCtx::cancel`] / [`WriteCtx::reschedule`] for timers, and it all
/// commits together or not at all. Never run `BEGIN`, `COMMIT`, `ROLLBACK` or `RELEASE` of an
/// outer savepoint yourself: the transaction belongs to the whole group (the writer detects an
/// ended transaction and fails the group). Nested `SAVEPOINT`s of your own are fine.
pub struct WriteCtx<'a, 'c> {
    prepared: &'a Prepared<'c>,
    generation: &'a mut i64,
    outbox: bool,
}

impl std::fmt::Debug for WriteCtx<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WriteCtx").field("generation", &self.generation).finish_non_exhaustive()
    }
}

impl<'a, 'c> WriteCtx<'a, 'c> {
    /// The write connection, for SQL whose text is not `'static` (prefer [`WriteCtx::prepare`]).
    pub fn connection(&self) -> &'c Connection {
        self.prepared.conn()
    }

    /// The write thread's statement for `sql`, prepared once and kept for the connection's life
    /// (see `prepared.rs`): cheaper than `prepare_cached`, which hashes and copies the text on
    /// every use. The statement does not borrow the context, so timer operations can run while
    /// it is held.
    pub fn prepare(&self, sql: &'static str) -> rusqlite::Result<Stmt<'a, 'c>> {
        self.prepared.get(sql)
    }

    fn exec(&self, sql: &'static str) -> rusqlite::Result<()> {
        self.prepared.exec(sql)
    }

    fn next_generation(&mut self) -> i64 {
        *self.generation += 1;
        *self.generation
    }

    /// Upserts timers exactly as [`overdue_core::Store::schedule`] does, all or none (in a nested
    /// savepoint). The specs must already be validated (`Limits::check`) and free of duplicates.
    /// Returns the new generations in input order.
    pub fn schedule(&mut self, specs: &[TimerSpec], now: i64) -> Result<Vec<u64>> {
        if specs.len() <= 1 && !self.outbox {
            // One statement: SQLite undoes it by itself if it fails.
            return self.upsert_all(specs, now);
        }
        self.nested("schedule", |ctx| ctx.upsert_all(specs, now))
    }

    /// [`WriteCtx::schedule`] without the nested savepoint, for a closure that returns the
    /// error when this fails: some of `specs` may then already be written, and only the
    /// closure's own savepoint (which the writer rolls back when the closure returns `Err`)
    /// undoes them. Saves two statements per call on the writer thread.
    pub fn schedule_or_fail(&mut self, specs: &[TimerSpec], now: i64) -> Result<Vec<u64>> {
        self.upsert_all(specs, now)
    }

    /// Removes a timer, as [`overdue_core::Store::cancel`]; returns the removed generation.
    ///
    /// A read of the generation, then a plain `DELETE` of that generation: the only writing
    /// statement, so the cancel job stays all-or-nothing without a savepoint. (SQLite buffers
    /// `DELETE … RETURNING` rows in an ephemeral table whose setup costs more than the read.)
    pub fn cancel(&mut self, queue: &str, key: &str) -> Result<Option<u64>> {
        let found = {
            let mut stmt = self.prepare(Q.lock_timer).store_err("cancel")?;
            stmt.query_row(params![queue, key], |row| row.get::<_, i64>(0)).optional().store_err("cancel")?
        };
        let Some(generation) = found else { return Ok(None) };
        let mut stmt = self.prepare(Q.settle_done).store_err("cancel")?;
        let removed = stmt.execute(params![queue, key, generation]).store_err("cancel")?;
        Ok((removed > 0).then(|| gen_out(generation)))
    }

    /// Removes a timer whatever its generation, in one `DELETE` (no read of the generation):
    /// for a caller that does not need it, as a transition cancelling its order's timers.
    /// Returns whether a timer was removed.
    pub fn remove(&mut self, queue: &str, key: &str) -> Result<bool> {
        let mut stmt = self.prepare(DELETE_TIMER).store_err("cancel")?;
        Ok(stmt.execute(params![queue, key]).store_err("cancel")? > 0)
    }

    /// Moves a timer, as [`overdue_core::Store::reschedule`]; returns the new generation.
    pub fn reschedule(&mut self, queue: &str, key: &str, due_at: i64, now: i64) -> Result<Option<u64>> {
        let generation = self.next_generation();
        let mut stmt = self.prepare(Q.reschedule_timer).store_err("reschedule")?;
        let changed = stmt.execute(params![queue, key, due_at, generation, now]).store_err("reschedule")?;
        if changed > 0 {
            self.note_outbox(queue, key, generation, due_at)?;
        }
        Ok((changed > 0).then(|| gen_out(generation)))
    }

    /// Runs `f` in a savepoint of its own, so an error leaves nothing behind.
    fn nested<T>(&mut self, what: &str, f: impl FnOnce(&mut Self) -> Result<T>) -> Result<T> {
        self.exec("SAVEPOINT overdue_ctx").store_err(what)?;
        match f(self) {
            Ok(v) => {
                self.exec("RELEASE overdue_ctx").store_err(what)?;
                Ok(v)
            }
            Err(e) => {
                if let Err(re) = self.exec("ROLLBACK TO overdue_ctx")
                    .and_then(|()| self.exec("RELEASE overdue_ctx"))
                {
                    tracing::warn!(error = %re, "rolling back a nested savepoint failed");
                }
                Err(e)
            }
        }
    }

    /// The upsert loop, without a savepoint of its own (the store's jobs have one already).
    pub(crate) fn upsert_all(&mut self, specs: &[TimerSpec], now: i64) -> Result<Vec<u64>> {
        let mut stmt = self.prepare(Q.upsert_timer).store_err("schedule")?;
        let mut out = Vec::with_capacity(specs.len());
        for s in specs {
            let generation = *self.generation + 1;
            *self.generation = generation;
            stmt.execute(params![s.queue, s.key, s.due_at, s.payload, generation, now])
                .map_err(|e| sql_error("schedule", e))?;
            self.note_outbox(&s.queue, &s.key, generation, s.due_at)?;
            out.push(gen_out(generation));
        }
        Ok(out)
    }

    /// Records a notice for the external trigger's relay, when the outbox is on.
    fn note_outbox(&self, queue: &str, key: &str, generation: i64, due_at: i64) -> Result<()> {
        if self.outbox {
            let mut stmt = self.prepare(OUTBOX_INSERT).store_err("outbox")?;
            stmt.execute(params![queue, key, generation, due_at]).store_err("outbox")?;
        }
        Ok(())
    }

    /// Deletes relayed outbox rows.
    pub(crate) fn outbox_ack(&mut self, seqs: &[i64]) -> Result<()> {
        let mut stmt = self.prepare(OUTBOX_DELETE).store_err("outbox ack")?;
        for seq in seqs {
            stmt.execute([seq]).store_err("outbox ack")?;
        }
        Ok(())
    }

    /// Claims the given generations (see the claim contract in `overdue_core::store`).
    pub(crate) fn claim(
        &mut self,
        timers: &[TimerRef],
        owner: &str,
        now: i64,
        lease_until: i64,
    ) -> Result<Vec<Claimed>> {
        // A plain conditional UPDATE, then a point read of what it claimed: SQLite buffers
        // `UPDATE … RETURNING` rows in an ephemeral table whose setup costs more than the read.
        let mut stmt = self.prepare(Q.claim_timer).store_err("claim")?;
        let mut read = self.prepare(Q.claimed_row).store_err("claim")?;
        let mut out = Vec::new();
        for t in timers {
            let Some(generation) = gen_in(t.generation) else { continue };
            let claimed = stmt.execute(params![t.queue, t.key, generation, now, owner, lease_until]).store_err("claim")?;
            if claimed == 0 {
                continue;
            }
            let row = read
                .query_row(params![t.queue, t.key], |row| {
                    Ok((row.get::<_, Vec<u8>>(0)?, row.get::<_, i64>(1)?, row.get::<_, i64>(2)?))
                })
                .optional()
                .store_err("claim")?;
            if let Some((payload, attempts, due_at)) = row {
                let timer =
                    TimerRef { queue: t.queue.clone(), key: t.key.clone(), generation: t.generation, due_at };
                out.push(Claimed { timer, payload, attempts: attempts_out(attempts) });
            }
        }
        Ok(out)
    }

    /// Finds due, unclaimed timers earliest first and claims them, in one statement.
    pub(crate) fn claim_due(
        &mut self,
        now: i64,
        due_before: i64,
        limit: u32,
        owner: &str,
        lease_until: i64,
    ) -> Result<Vec<Claimed>> {
        let mut stmt = self.prepare(Q.claim_due).store_err("claim due")?;
        let rows = stmt
            .query_map(params![due_before.min(now), now, limit, owner, lease_until], |row| {
                let timer = TimerRef {
                    queue: row.get(0)?,
                    key: row.get(1)?,
                    generation: gen_out(row.get(2)?),
                    due_at: row.get(3)?,
                };
                Ok(Claimed { timer, payload: row.get(4)?, attempts: attempts_out(row.get(5)?) })
            })
            .store_err("claim due")?;
        let mut claimed = rows.collect::<rusqlite::Result<Vec<_>>>().store_err("claim due")?;
        // RETURNING comes in storage order; the contract is earliest first.
        claimed.sort_unstable_by(|a, b| {
            (a.timer.due_at, &a.timer.queue, &a.timer.key).cmp(&(
                b.timer.due_at,
                &b.timer.queue,
                &b.timer.key,
            ))
        });
        Ok(claimed)
    }

    /// Applies handler outcomes; each applies only while the generation is unchanged.
    pub(crate) fn settle(&mut self, batch: &[Settlement], now: i64) -> Result<()> {
        for s in batch {
            let t = s.timer();
            let Some(generation) = gen_in(t.generation) else { continue };
            match s {
                Settlement::Done(_) => {
                    let mut stmt = self.prepare(Q.settle_done).store_err("settle done")?;
                    stmt.execute(params![t.queue, t.key, generation]).store_err("settle done")?;
                }
                Settlement::Retry { due_at, attempts, error, .. } => {
                    let mut stmt = self.prepare(Q.settle_retry).store_err("settle retry")?;
                    let changed = stmt
                        .execute(params![t.queue, t.key, generation, due_at, attempts, error, now])
                        .store_err("settle retry")?;
                    if changed > 0 {
                        self.note_outbox(&t.queue, &t.key, generation, *due_at)?;
                    }
                }
                Settlement::DeadLetter { attempts, error, failed_at, .. } => {
                    let mut stmt = self.prepare(Q.dead_letter_timer).store_err("dead-letter")?;
                    let moved = stmt
                        .execute(params![t.queue, t.key, generation, attempts, error, failed_at])
                        .store_err("dead-letter")?;
                    if moved > 0 {
                        let mut stmt = self.prepare(Q.settle_done).store_err("dead-letter")?;
                        stmt.execute(params![t.queue, t.key, generation]).store_err("dead-letter")?;
                    }
                }
                Settlement::Release(_) => {
                    let mut stmt = self.prepare(Q.settle_release).store_err("settle release")?;
                    stmt.execute(params![t.queue, t.key, generation]).store_err("settle release")?;
                }
            }
        }
        Ok(())
    }

    /// Moves a dead letter back into the timers with a new generation.
    pub(crate) fn replay(&mut self, id: i64, due_at: i64, now: i64) -> Result<Option<u64>> {
        let letter = {
            let mut stmt = self.prepare(Q.select_dead_letter).store_err("replay")?;
            stmt.query_row([id], |row| {
                Ok(TimerSpec { queue: row.get(0)?, key: row.get(1)?, due_at, payload: row.get(2)? })
            })
            .optional()
            .store_err("replay")?
        };
        let Some(spec) = letter else { return Ok(None) };
        let generation = self.upsert_all(std::slice::from_ref(&spec), now)?;
        let mut stmt = self.prepare(Q.delete_dead_letter).store_err("replay")?;
        stmt.execute([id]).store_err("replay")?;
        Ok(generation.first().copied())
    }
}
