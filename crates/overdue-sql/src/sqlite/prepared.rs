//! The writer thread's prepared statements, kept for the connection's whole life.
//!
//! rusqlite's `prepare_cached` is an LRU keyed by the SQL text: every use trims and hashes the
//! text, takes the statement out of the map, copies the text into a fresh `Arc<str>` key, and on
//! drop clears the bindings, hashes again and re-inserts it. On the order service's write path
//! (~20 statements per order) that was 10 % of the writer thread's instructions (callgrind,
//! docs/benchmarks.md). Here every write statement is a `&'static str`, so its slot is found by
//! the text's address and length (no hashing of the text, no copy, no allocation) and the
//! statement stays in its slot between uses.
//!
//! A slot's statement is lent as a [`Stmt`] (a `RefCell` borrow). If the same text is already
//! lent (one statement used twice at once) or every slot is taken, the statement comes from
//! rusqlite's cache as before: slower, never wrong. Statements are reset by every `execute`,
//! `query_row` and dropped `Rows`, and rebound in full by each call, so a statement lent again
//! carries nothing over from its last use.

use std::cell::{RefCell, RefMut};
use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::ops::{Deref, DerefMut};

use rusqlite::{CachedStatement, Connection, PrepFlags, Statement};

/// Slots on the writer thread: more than the distinct write statements of the store and the order
/// service together (~50); the rest go through rusqlite's cache.
const SLOTS: usize = 128;

/// Statements of one connection by the address and length of their `'static` SQL text.
pub(crate) struct Prepared<'c> {
    conn: &'c Connection,
    index: RefCell<HashMap<(usize, usize), usize, BuildHasherDefault<AddressHasher>>>,
    slots: Box<[RefCell<Option<Statement<'c>>>]>,
}

impl<'c> Prepared<'c> {
    pub(crate) fn new(conn: &'c Connection) -> Self {
        Prepared { conn, index: RefCell::default(), slots: (0..SLOTS).map(|_| RefCell::new(None)).collect() }
    }

    /// The connection the statements belong to.
    pub(crate) fn conn(&self) -> &'c Connection {
        self.conn
    }

    /// Runs a parameterless statement (`BEGIN`, `SAVEPOINT …`) from its slot.
    pub(crate) fn exec(&self, sql: &'static str) -> rusqlite::Result<()> {
        self.get(sql)?.execute([])?;
        Ok(())
    }

    /// The statement for `sql`, prepared on first use.
    pub(crate) fn get<'p>(&'p self, sql: &'static str) -> rusqlite::Result<Stmt<'p, 'c>> {
        let key = (sql.as_ptr() as usize, sql.len());
        let slot = {
            let mut index = self.index.borrow_mut();
            let next = index.len();
            match index.get(&key) {
                Some(&i) => Some(i),
                None if next < self.slots.len() => {
                    index.insert(key, next);
                    Some(next)
                }
                None => None,
            }
        };
        if let Some(mut held) = slot.and_then(|i| self.slots[i].try_borrow_mut().ok()) {
            if held.is_none() {
                *held = Some(self.conn.prepare_with_flags(sql, PrepFlags::SQLITE_PREPARE_PERSISTENT)?);
            }
            return Ok(Stmt::Kept(RefMut::map(held, |s| s.as_mut().expect("filled above"))));
        }
        self.conn.prepare_cached(sql).map(Stmt::Cached)
    }
}

/// A statement lent from [`Prepared`] (or, when its slot is busy, from rusqlite's cache).
pub enum Stmt<'p, 'c> {
    /// From its slot; returned when dropped.
    Kept(RefMut<'p, Statement<'c>>),
    /// From rusqlite's statement cache.
    Cached(CachedStatement<'c>),
}

impl std::fmt::Debug for Stmt<'_, '_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let from = match self {
            Stmt::Kept(_) => "kept",
            Stmt::Cached(_) => "cached",
        };
        f.debug_struct("Stmt").field("from", &from).finish_non_exhaustive()
    }
}

impl<'c> Deref for Stmt<'_, 'c> {
    type Target = Statement<'c>;
    fn deref(&self) -> &Statement<'c> {
        match self {
            Stmt::Kept(s) => s,
            Stmt::Cached(s) => s,
        }
    }
}

impl DerefMut for Stmt<'_, '_> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        match self {
            Stmt::Kept(s) => s,
            Stmt::Cached(s) => s,
        }
    }
}

/// Hashes the `(address, length)` keys: two words, already unique, so one multiply suffices.
#[derive(Default)]
pub(crate) struct AddressHasher(u64);

impl Hasher for AddressHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(u64::from(*b));
        }
    }
    fn write_usize(&mut self, n: usize) {
        self.write_u64(n as u64);
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = (self.0.rotate_left(5) ^ n).wrapping_mul(0x517c_c1b7_2722_0a95);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> Connection {
        let c = Connection::open_in_memory().expect("open");
        c.execute_batch("CREATE TABLE t (a INTEGER)").expect("table");
        c
    }

    const INSERT: &str = "INSERT INTO t (a) VALUES (?1)";
    const COUNT: &str = "SELECT count(*), coalesce(sum(a), 0) FROM t";

    #[test]
    fn a_kept_statement_is_reused_and_carries_nothing_over() {
        let c = conn();
        let p = Prepared::new(&c);
        for i in 1..=3 {
            let mut s = p.get(INSERT).expect("insert");
            assert!(matches!(s, Stmt::Kept(_)), "the slot is free between uses");
            s.execute([i]).expect("run");
        }
        let (n, sum): (i64, i64) = p.get(COUNT).expect("count").query_row([], |r| Ok((r.get(0)?, r.get(1)?))).expect("row");
        assert_eq!((n, sum), (3, 6));
        assert_eq!(p.index.borrow().len(), 2, "one slot per text");
    }

    #[test]
    fn the_same_text_twice_at_once_falls_back_to_the_cache() {
        let c = conn();
        let p = Prepared::new(&c);
        let mut first = p.get(INSERT).expect("first");
        let mut second = p.get(INSERT).expect("second");
        assert!(matches!(first, Stmt::Kept(_)));
        assert!(matches!(second, Stmt::Cached(_)), "the slot is lent out");
        first.execute([1]).expect("first");
        second.execute([2]).expect("second");
        drop((first, second));
        let n: i64 = p.get(COUNT).expect("count").query_row([], |r| r.get(0)).expect("row");
        assert_eq!(n, 2);
    }

    #[test]
    fn a_bad_statement_is_an_error_and_leaves_its_slot_empty() {
        let c = conn();
        let p = Prepared::new(&c);
        assert!(p.get("INSERT INTO nowhere VALUES (1)").is_err());
        assert!(p.get("INSERT INTO nowhere VALUES (1)").is_err(), "still an error, not a stale statement");
        assert!(p.get(INSERT).expect("a good one still works").execute([1]).is_ok());
    }

    #[test]
    fn past_the_last_slot_statements_come_from_the_cache() {
        let c = conn();
        let p = Prepared::new(&c);
        let texts: Vec<&'static str> =
            (0..SLOTS + 2).map(|i| &*Box::leak(format!("SELECT {i}").into_boxed_str())).collect();
        for (i, t) in texts.iter().enumerate() {
            let mut s = p.get(t).expect("prepare");
            assert_eq!(matches!(s, Stmt::Kept(_)), i < SLOTS, "statement {i}");
            let v: i64 = s.query_row([], |r| r.get(0)).expect("row");
            assert_eq!(v, i as i64);
        }
    }
}
