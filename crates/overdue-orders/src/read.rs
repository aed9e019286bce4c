//! Reads on the service's own read-only connections.
//!
//! The store's writer thread is the only writer; reads never go through it. WAL lets these
//! connections read beside it: each statement (or explicit read transaction) sees the last
//! committed state at its start, and a write whose `store.write(..)` returned is visible to every
//! read that starts afterwards. Reads run on tokio's blocking pool, at most one per connection.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use overdue_sql::SqlResultExt;
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::Semaphore;

use crate::error::{OrderError, Result};
use crate::model::*;
use crate::sql;

/// Read-only connections the service keeps open.
pub(crate) const READERS: usize = 4;
/// How long a read waits for a foreign process's lock (a backup, the `sqlite3` shell).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// Prepared statements cached per connection.
const STATEMENT_CACHE: usize = 32;
/// Most ids listed in each field of an [`InvariantReport`].
pub(crate) const MAX_REPORTED: usize = 1_000;

/// A fixed set of read-only connections and one permit per connection.
#[derive(Debug)]
pub(crate) struct ReadPool {
    conns: Mutex<Vec<Connection>>,
    permits: Arc<Semaphore>,
    path: PathBuf,
}

fn open_reader(path: &Path) -> Result<Connection> {
    let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX;
    let conn = Connection::open_with_flags(path, flags)
        .store_err(&format!("open {} for reading", path.display()))?;
    conn.busy_timeout(BUSY_TIMEOUT).store_err("set busy timeout")?;
    conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
    // Keep cached plans whatever is bound (no re-prepare per new `LIMIT ?` value).
    conn.set_db_config(rusqlite::config::DbConfig::SQLITE_DBCONFIG_ENABLE_QPSG, true)
        .store_err("enable query planner stability")?;
    Ok(conn)
}

impl ReadPool {
    /// Opens `n` connections (blocking; call from a blocking thread).
    pub(crate) fn open(path: PathBuf, n: usize) -> Result<ReadPool> {
        let n = n.max(1);
        let conns = (0..n).map(|_| open_reader(&path)).collect::<Result<Vec<_>>>()?;
        Ok(ReadPool { conns: Mutex::new(conns), permits: Arc::new(Semaphore::new(n)), path })
    }

    /// Runs `f` on a pooled connection on a blocking thread.
    pub(crate) async fn read<T, F>(self: &Arc<Self>, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        let permit = Arc::clone(&self.permits).acquire_owned().await.map_err(|_| {
            OrderError::Store(overdue::Error::Config("the order service's read pool is closed".into()))
        })?;
        let pool = Arc::clone(self);
        let task = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            let pooled = pool.conns.lock().unwrap_or_else(PoisonError::into_inner).pop();
            // A connection lost to a panicking read is replaced here.
            let mut conn = match pooled {
                Some(c) => c,
                None => open_reader(&pool.path)?,
            };
            let out = f(&mut conn);
            pool.conns.lock().unwrap_or_else(PoisonError::into_inner).push(conn);
            out
        });
        task.await.map_err(|e| {
            OrderError::Store(overdue::Error::store("sqlite", format!("order read task failed: {e}"), false, e))
        })?
    }
}

pub(crate) fn product_row(r: &Row<'_>) -> rusqlite::Result<Product> {
    Ok(Product {
        id: r.get(0)?,
        name: r.get(1)?,
        price_cents: r.get(2)?,
        stock: r.get(3)?,
        stock_total: r.get(4)?,
        created_at: r.get(5)?,
    })
}

/// An order row in [`sql::ORDER_COLUMNS`] order, without its items.
pub(crate) fn order_row(r: &Row<'_>) -> rusqlite::Result<Order> {
    Ok(Order {
        id: r.get(0)?,
        buyer: r.get(1)?,
        status: r.get(2)?,
        total_cents: r.get(3)?,
        pay_deadline: r.get(4)?,
        created_at: r.get(5)?,
        updated_at: r.get(6)?,
        version: r.get(7)?,
        close_reason: r.get(8)?,
        items: Vec::new(),
    })
}

/// The lines of an order (works on the writer and on readers).
pub(crate) fn items(conn: &Connection, order_id: &str) -> overdue::Result<Vec<OrderItem>> {
    let mut stmt = conn.prepare_cached(sql::SELECT_ITEMS).store_err("read order items")?;
    let rows = stmt
        .query_map([order_id], |r| Ok(OrderItem { product_id: r.get(0)?, quantity: r.get(1)?, price_cents: r.get(2)? }))
        .store_err("read order items")?;
    rows.collect::<rusqlite::Result<Vec<_>>>().store_err("read order items")
}

pub(crate) fn product(conn: &Connection, id: &str) -> Result<Product> {
    conn.prepare_cached(sql::SELECT_PRODUCT)
        .and_then(|mut s| s.query_row([id], product_row).optional())
        .store_err("read product")?
        .ok_or_else(|| OrderError::NotFound { what: "product", id: id.to_owned() })
}

pub(crate) fn products(conn: &Connection, after: &str, limit: u32) -> Result<Vec<Product>> {
    let mut stmt = conn.prepare_cached(sql::LIST_PRODUCTS).store_err("list products")?;
    let rows = stmt.query_map(params![after, limit], product_row).store_err("list products")?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>().store_err("list products")?)
}

pub(crate) fn order(conn: &mut Connection, id: &str) -> Result<Order> {
    // One read transaction: the order and its lines from the same snapshot.
    let tx = conn.transaction().store_err("read order")?;
    let found = tx
        .prepare_cached(sql::SELECT_ORDER)
        .and_then(|mut s| s.query_row([id], order_row).optional())
        .store_err("read order")?;
    let mut order = found.ok_or_else(|| OrderError::NotFound { what: "order", id: id.to_owned() })?;
    order.items = items(&tx, id)?;
    Ok(order)
}

pub(crate) fn events(conn: &mut Connection, id: &str) -> Result<Vec<OrderEvent>> {
    let tx = conn.transaction().store_err("read order events")?;
    let exists = tx
        .prepare_cached(sql::ORDER_STATE)
        .and_then(|mut s| s.query_row([id], |_| Ok(())).optional())
        .store_err("read order events")?;
    if exists.is_none() {
        return Err(OrderError::NotFound { what: "order", id: id.to_owned() });
    }
    let mut stmt = tx.prepare_cached(sql::SELECT_EVENTS).store_err("read order events")?;
    let rows = stmt
        .query_map([id], |r| Ok(OrderEvent { kind: r.get(0)?, at: r.get(1)?, source: r.get(2)?, detail: r.get(3)? }))
        .store_err("read order events")?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>().store_err("read order events")?)
}

/// Newest first, filtered; `limit` already validated.
pub(crate) fn orders(conn: &mut Connection, q: &OrderQuery, limit: u32) -> Result<Vec<Order>> {
    let mut where_ = Vec::new();
    let mut args: Vec<Box<dyn rusqlite::ToSql>> = Vec::new();
    if let Some(s) = q.status {
        args.push(Box::new(s));
        where_.push(format!("status = ?{}", args.len()));
    }
    if let Some(b) = &q.buyer {
        args.push(Box::new(b.clone()));
        where_.push(format!("buyer = ?{}", args.len()));
    }
    if let Some(b) = &q.before {
        args.push(Box::new(b.clone()));
        where_.push(format!("id < ?{}", args.len()));
    }
    args.push(Box::new(limit));
    let filter = if where_.is_empty() { String::new() } else { format!("WHERE {}", where_.join(" AND ")) };
    let text = format!("SELECT {} FROM orders {filter} ORDER BY id DESC LIMIT ?{}", sql::ORDER_COLUMNS, args.len());
    let tx = conn.transaction().store_err("list orders")?;
    let mut out = {
        let mut stmt = tx.prepare_cached(&text).store_err("list orders")?;
        let rows = stmt
            .query_map(rusqlite::params_from_iter(args.iter().map(|a| a.as_ref())), order_row)
            .store_err("list orders")?;
        rows.collect::<rusqlite::Result<Vec<_>>>().store_err("list orders")?
    };
    for o in &mut out {
        o.items = items(&tx, &o.id)?;
    }
    Ok(out)
}

pub(crate) fn outbox_pending(conn: &Connection, limit: u32) -> Result<Vec<OutboxMessage>> {
    let mut stmt = conn.prepare_cached(sql::OUTBOX_PENDING).store_err("read outbox")?;
    let rows = stmt
        .query_map([limit], |r| {
            Ok(OutboxMessage {
                id: r.get(0)?,
                topic: r.get(1)?,
                payload: r.get(2)?,
                created_at: r.get(3)?,
                attempts: u32::try_from(r.get::<_, i64>(4)?.max(0)).unwrap_or(u32::MAX),
            })
        })
        .store_err("read outbox")?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>().store_err("read outbox")?)
}

/// `(key, count)` rows of a two-column `GROUP BY` query.
fn counts(conn: &Connection, text: &str) -> Result<Vec<(String, u64)>> {
    let mut stmt = conn.prepare_cached(text).store_err("count")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get::<_, String>(0)?, u64::try_from(r.get::<_, i64>(1)?).unwrap_or(0))))
        .store_err("count")?;
    Ok(rows.collect::<rusqlite::Result<Vec<_>>>().store_err("count")?)
}

/// Event counts per kind from a `GROUP BY` query.
pub(crate) fn transition_counts(conn: &Connection) -> Result<Vec<(String, u64)>> {
    counts(conn, sql::TRANSITION_COUNTS)
}

/// Order counts per status from a `GROUP BY` query.
pub(crate) fn status_counts(conn: &Connection) -> Result<Vec<(String, u64)>> {
    counts(conn, sql::STATUS_COUNTS)
}

/// Every known event kind (zero when absent), then any unknown kinds found.
pub(crate) fn fill_kinds(found: Vec<(String, u64)>) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = EVENT_KINDS
        .iter()
        .map(|k| (k.to_string(), found.iter().find(|(f, _)| f == k).map_or(0, |(_, n)| *n)))
        .collect();
    out.extend(found.into_iter().filter(|(k, _)| !EVENT_KINDS.contains(&k.as_str())));
    out
}

/// Every status, zero when absent, in lifecycle order.
pub(crate) fn fill_statuses(found: &[(String, u64)]) -> Vec<(OrderStatus, u64)> {
    OrderStatus::ALL
        .iter()
        .map(|s| (*s, found.iter().find(|(f, _)| f == s.as_str()).map_or(0, |(_, n)| *n)))
        .collect()
}

/// Event-kind bits, in [`EVENT_KINDS`] order, as [`sql::INVARIANT_ORDERS`] computes them.
mod bit {
    pub const CREATED: i64 = 1;
    pub const REMINDED: i64 = 2;
    pub const PAID: i64 = 4;
    pub const CLOSED: i64 = 8;
    pub const SHIPPED: i64 = 16;
    pub const COMPLETED: i64 = 32;
    pub const REFUND_REQUESTED: i64 = 64;
    pub const REFUNDED: i64 = 128;
    pub const REFUND_REJECTED: i64 = 256;
    pub const UNKNOWN: i64 = 512;
}

/// Whether an order's status agrees with its events, version and close reason. `mask` has the
/// optional `reminded` bit removed.
fn consistent(status: OrderStatus, mask: i64, version: i64, close_reason: Option<&str>) -> bool {
    use bit::*;
    let base = CREATED | PAID;
    let refund = |last: i64| [base | REFUND_REQUESTED | last, base | SHIPPED | REFUND_REQUESTED | last];
    let ok_mask = match status {
        OrderStatus::PendingPayment => mask == CREATED,
        OrderStatus::Paid => mask == base,
        OrderStatus::Shipped => mask == base | SHIPPED,
        OrderStatus::Completed => mask == base | SHIPPED | COMPLETED,
        OrderStatus::Closed => mask == CREATED | CLOSED,
        OrderStatus::RefundRequested => refund(0).contains(&mask),
        OrderStatus::Refunded => refund(REFUNDED).contains(&mask),
        OrderStatus::RefundRejected => refund(REFUND_REJECTED).contains(&mask),
    };
    // version 1 at creation, +1 per status change (every event but `created` and `reminded`).
    let transitions = i64::from((mask & !CREATED).count_ones());
    let reason_ok = match status {
        OrderStatus::Closed => matches!(close_reason, Some(CLOSE_TIMEOUT | CLOSE_BUYER_CANCEL)),
        _ => close_reason.is_none(),
    };
    ok_mask && version == 1 + transitions && reason_ok
}

pub(crate) fn push_capped(v: &mut Vec<String>, id: String) {
    if v.len() < MAX_REPORTED {
        v.push(id);
    }
}

/// One row of [`sql::INVARIANT_ORDERS`] (any backend's), judged into `report`.
#[derive(Debug)]
pub(crate) struct OrderFacts {
    pub(crate) id: String,
    pub(crate) status: OrderStatus,
    pub(crate) version: i64,
    pub(crate) close_reason: Option<String>,
    pub(crate) pay_deadline: i64,
    pub(crate) mask: i64,
}

/// Adds what is wrong with one order to `report` (paid and closed, overdue and unpaid, status
/// disagreeing with its events).
pub(crate) fn judge(report: &mut InvariantReport, o: OrderFacts, now: i64, bound_ms: i64) {
    report.orders += 1;
    let overdue_before = now.saturating_sub(bound_ms);
    let reached_paid = o.mask & bit::PAID != 0 || !matches!(o.status, OrderStatus::PendingPayment | OrderStatus::Closed);
    if o.mask & bit::CLOSED != 0 && reached_paid {
        push_capped(&mut report.paid_and_closed, o.id.clone());
    }
    if o.status == OrderStatus::PendingPayment && o.pay_deadline < overdue_before {
        push_capped(&mut report.overdue_unpaid, o.id.clone());
    }
    if o.mask & bit::UNKNOWN != 0 || !consistent(o.status, o.mask & !bit::REMINDED, o.version, o.close_reason.as_deref()) {
        push_capped(&mut report.inconsistent, o.id);
    }
}

/// The invariant check, in one read transaction (one consistent snapshot).
pub(crate) fn invariants(conn: &mut Connection, now: i64, bound_ms: i64) -> Result<InvariantReport> {
    let tx = conn.transaction().store_err("check invariants")?;
    let mut report = InvariantReport::default();
    {
        let mut stmt = tx.prepare(sql::INVARIANT_STOCK).store_err("check stock")?;
        let mut rows = stmt.query([]).store_err("check stock")?;
        while let Some(r) = rows.next().store_err("check stock")? {
            let (id, stock, total, held): (String, i64, i64, i64) =
                (r.get(0).store_err("check stock")?, r.get(1).store_err("check stock")?, r.get(2).store_err("check stock")?, r.get(3).store_err("check stock")?);
            tracing::warn!(product = %id, stock, stock_total = total, held, "stock is not conserved");
            push_capped(&mut report.stock_mismatches, id);
        }
    }
    {
        let mut stmt = tx.prepare(sql::INVARIANT_ORDERS).store_err("check orders")?;
        let mut rows = stmt.query([]).store_err("check orders")?;
        while let Some(r) = rows.next().store_err("check orders")? {
            let facts = OrderFacts {
                id: r.get(0).store_err("check orders")?,
                status: r.get(1).store_err("check orders")?,
                version: r.get(2).store_err("check orders")?,
                close_reason: r.get(3).store_err("check orders")?,
                pay_deadline: r.get(4).store_err("check orders")?,
                mask: r.get(5).store_err("check orders")?,
            };
            judge(&mut report, facts, now, bound_ms);
        }
    }
    {
        let mut stmt = tx.prepare(sql::INVARIANT_ORPHAN_EVENTS).store_err("check events")?;
        let mut rows = stmt.query([]).store_err("check events")?;
        while let Some(r) = rows.next().store_err("check events")? {
            push_capped(&mut report.inconsistent, r.get(0).store_err("check events")?);
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::bit::*;
    use super::*;

    #[test]
    fn status_and_events_agree_only_on_the_documented_paths() {
        use OrderStatus::*;
        assert!(consistent(PendingPayment, CREATED, 1, None));
        assert!(consistent(Closed, CREATED | CLOSED, 2, Some(CLOSE_TIMEOUT)));
        assert!(!consistent(Closed, CREATED | CLOSED, 2, None), "a closed order needs its reason");
        assert!(!consistent(Closed, CREATED | CLOSED | PAID, 3, Some(CLOSE_TIMEOUT)));
        assert!(consistent(Completed, CREATED | PAID | SHIPPED | COMPLETED, 4, None));
        assert!(!consistent(Completed, CREATED | PAID | SHIPPED | COMPLETED, 3, None), "version counts transitions");
        assert!(consistent(Refunded, CREATED | PAID | REFUND_REQUESTED | REFUNDED, 4, None));
        assert!(consistent(RefundRejected, CREATED | PAID | SHIPPED | REFUND_REQUESTED | REFUND_REJECTED, 5, None));
        assert!(!consistent(Paid, CREATED, 1, None));
    }
}
