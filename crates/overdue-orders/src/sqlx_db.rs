//! The order service on PostgreSQL and MySQL (sqlx): the order tables in the same database (and
//! schema) as the store's `timers`, every write one database transaction that also writes the
//! timers through the store's `schedule_in` / `cancel_in`. So an order never exists without its
//! close timer on these backends either, and several `overdue serve` nodes share one database.
//!
//! ## How it is laid out
//!
//! - The **flows** (create an order, apply a move, remind) are written once, below, over the
//!   [`Tx`] trait: the handful of statements a flow runs inside its transaction.
//! - [`Stmts`] holds the statement texts, written once with `?` placeholders; PostgreSQL gets them
//!   renumbered to `$1, $2, …`, and the few places where the dialects differ (insert-once,
//!   integer casts) are spelled per dialect there.
//! - The `backend!` macro writes the same `Tx` and read code for both drivers (their row,
//!   connection and store types differ, the code does not).
//!
//! ## Concurrency
//!
//! Every transition is a conditional `UPDATE … WHERE status IN (…)`, so under READ COMMITTED
//! (PostgreSQL) and REPEATABLE READ (InnoDB) two nodes racing for one order serialize on its row
//! lock and the second sees 0 rows. Locks are taken in one order everywhere (an order's products
//! by id, then its order row, then its timer rows), so orders cannot deadlock each other; a
//! deadlock or serialization failure the database reports anyway (InnoDB gap locks) is retried
//! up to [`CONFLICT_RETRIES`] times with the whole transaction. MySQL's driver reports *matched*
//! rows (`CLIENT_FOUND_ROWS`), which is what the conditional updates count.

use std::sync::Arc;

use async_trait::async_trait;
use overdue::{Clock, TimerRef, TimerSpec};

use crate::db::{ApiMoved, OrderDb, OrderPlan};
use crate::error::{OrderError, Result};
use crate::machine::*;
use crate::model::*;
use crate::read::{OrderFacts, judge, push_capped};
use crate::schema::{self, Dialect};

/// Pool connections order transactions leave to the engine (claims, settlements, the
/// partition heartbeat).
const POOL_RESERVE: usize = 2;
/// Times a write transaction is run again after a deadlock or serialization failure.
const CONFLICT_RETRIES: usize = 3;

/// `overdue::Result`.
type R<T> = overdue::Result<T>;

/// The statements of one dialect.
#[derive(Debug)]
pub(crate) struct Stmts {
    insert_product: String,
    select_product: String,
    list_products: String,
    reserve_stock: String,
    product_price: String,
    product_stock: String,
    release_stock: String,
    insert_order: String,
    insert_item: String,
    insert_event: String,
    insert_event_once: String,
    transition: String,
    order_state: String,
    remind_target: String,
    insert_outbox: String,
    select_order: String,
    select_items: String,
    select_events: String,
    outbox_pending: String,
    outbox_delivered: String,
    outbox_failed: String,
    status_counts: String,
    transition_counts: String,
    invariant_stock: String,
    invariant_orders: String,
    invariant_orphans: String,
    order_columns: &'static str,
    dialect: Dialect,
}

/// `?` → `$1, $2, …` for PostgreSQL (no statement here has a `?` inside a literal).
fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 8);
    let mut n = 0;
    for c in sql.chars() {
        if c == '?' {
            n += 1;
            out.push('$');
            out.push_str(&n.to_string());
        } else {
            out.push(c);
        }
    }
    out
}

const ORDER_COLUMNS: &str = "id, buyer, status, total_cents, pay_deadline, created_at, updated_at, version, close_reason";

impl Stmts {
    pub(crate) fn new(dialect: Dialect) -> Stmts {
        let pg = dialect == Dialect::Postgres;
        let p = |s: &str| if pg { numbered(s) } else { s.to_owned() };
        // "insert unless it exists": PostgreSQL names the conflict, MySQL ignores the duplicate.
        let once = |table: &str, cols: &str, values: &str, conflict: &str| {
            if pg {
                p(&format!("INSERT INTO {table} ({cols}) VALUES ({values}) ON CONFLICT ({conflict}) DO NOTHING"))
            } else {
                format!("INSERT IGNORE INTO {table} ({cols}) VALUES ({values})")
            }
        };
        // SUM of BIGINT is NUMERIC (PostgreSQL) / DECIMAL (MySQL): cast back.
        let int = if pg { "BIGINT" } else { "SIGNED" };
        Stmts {
            insert_product: once(
                "products",
                "id, name, price_cents, stock, stock_total, created_at",
                "?, ?, ?, ?, ?, ?",
                "id",
            ),
            select_product: p("SELECT id, name, price_cents, stock, stock_total, created_at FROM products WHERE id = ?"),
            list_products: p(
                "SELECT id, name, price_cents, stock, stock_total, created_at FROM products WHERE id > ? ORDER BY id LIMIT ?",
            ),
            reserve_stock: p("UPDATE products SET stock = stock - ? WHERE id = ? AND stock >= ?"),
            product_price: p("SELECT price_cents FROM products WHERE id = ?"),
            product_stock: p("SELECT stock FROM products WHERE id = ?"),
            release_stock: p("UPDATE products SET stock = stock + ? WHERE id = ?"),
            insert_order: p(&format!(
                "INSERT INTO orders ({ORDER_COLUMNS}) VALUES (?, ?, 'pending_payment', ?, ?, ?, ?, 1, NULL)"
            )),
            insert_item: p("INSERT INTO order_items (order_id, product_id, quantity, price_cents) VALUES (?, ?, ?, ?)"),
            insert_event: p("INSERT INTO order_events (order_id, kind, at, source, detail) VALUES (?, ?, ?, ?, ?)"),
            insert_event_once: once(
                "order_events",
                "order_id, kind, at, source, detail",
                "?, ?, ?, ?, ?",
                "order_id, kind",
            ),
            transition: p(
                "UPDATE orders SET status = ?, version = version + 1, updated_at = ?, \
                 close_reason = COALESCE(?, close_reason) \
                 WHERE id = ? AND (status = ? OR status = ?) AND (? = 0 OR pay_deadline > ?)",
            ),
            order_state: p("SELECT status, pay_deadline FROM orders WHERE id = ?"),
            remind_target: p(
                "SELECT buyer, pay_deadline, total_cents FROM orders \
                 WHERE id = ? AND status = 'pending_payment' AND pay_deadline > ?",
            ),
            insert_outbox: p(
                "INSERT INTO outbox (topic, payload, created_at, delivered_at, attempts) VALUES (?, ?, ?, NULL, 0)",
            ),
            select_order: p(&format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = ?")),
            select_items: p(
                "SELECT product_id, quantity, price_cents FROM order_items WHERE order_id = ? ORDER BY product_id",
            ),
            select_events: p("SELECT kind, at, source, detail FROM order_events WHERE order_id = ? ORDER BY id"),
            outbox_pending: p(
                "SELECT id, topic, payload, created_at, attempts FROM outbox \
                 WHERE delivered_at IS NULL ORDER BY attempts, id LIMIT ?",
            ),
            outbox_delivered: p("UPDATE outbox SET delivered_at = ? WHERE id = ? AND delivered_at IS NULL"),
            outbox_failed: p("UPDATE outbox SET attempts = attempts + 1 WHERE id = ?"),
            status_counts: "SELECT status, COUNT(*) FROM orders GROUP BY status".to_owned(),
            transition_counts: "SELECT kind, COUNT(*) FROM order_events GROUP BY kind".to_owned(),
            invariant_stock: format!(
                "SELECT p.id, p.stock, p.stock_total, CAST(COALESCE(h.held, 0) AS {int}) \
                 FROM products p LEFT JOIN ( \
                     SELECT i.product_id AS product_id, SUM(i.quantity) AS held \
                     FROM order_items i JOIN orders o ON o.id = i.order_id \
                     WHERE o.status <> 'closed' GROUP BY i.product_id \
                 ) h ON h.product_id = p.id \
                 WHERE p.stock_total <> p.stock + COALESCE(h.held, 0) ORDER BY p.id"
            ),
            invariant_orders: format!(
                "SELECT o.id, o.status, o.version, o.close_reason, o.pay_deadline, \
                 CAST(COALESCE(SUM(CASE WHEN e.kind IS NULL THEN 0 \
                     WHEN e.kind = 'created' THEN 1 WHEN e.kind = 'reminded' THEN 2 WHEN e.kind = 'paid' THEN 4 \
                     WHEN e.kind = 'closed' THEN 8 WHEN e.kind = 'shipped' THEN 16 WHEN e.kind = 'completed' THEN 32 \
                     WHEN e.kind = 'refund_requested' THEN 64 WHEN e.kind = 'refunded' THEN 128 \
                     WHEN e.kind = 'refund_rejected' THEN 256 ELSE 512 END), 0) AS {int}) \
                 FROM orders o LEFT JOIN order_events e ON e.order_id = o.id \
                 GROUP BY o.id, o.status, o.version, o.close_reason, o.pay_deadline ORDER BY o.id"
            ),
            invariant_orphans: "SELECT DISTINCT e.order_id FROM order_events e \
                 LEFT JOIN orders o ON o.id = e.order_id WHERE o.id IS NULL ORDER BY e.order_id"
                .to_owned(),
            order_columns: ORDER_COLUMNS,
            dialect,
        }
    }

    /// The order listing with its filters: `(text, binds in order)`; the limit is bound last.
    fn list_orders(&self, q: &OrderQuery) -> String {
        let mut conds = Vec::new();
        if q.status.is_some() {
            conds.push("status = ?");
        }
        if q.buyer.is_some() {
            conds.push("buyer = ?");
        }
        if q.before.is_some() {
            conds.push("id < ?");
        }
        let filter = if conds.is_empty() { String::new() } else { format!("WHERE {}", conds.join(" AND ")) };
        let text = format!("SELECT {} FROM orders {filter} ORDER BY id DESC LIMIT ?", self.order_columns);
        if self.dialect == Dialect::Postgres { numbered(&text) } else { text }
    }
}

/// The statements a flow runs inside one transaction.
#[async_trait]
pub(crate) trait Tx: Send + Sized {
    /// Takes `quantity` of the product's stock: its unit price, or `None` (missing or short).
    async fn reserve(&mut self, product_id: &str, quantity: i64) -> R<Option<i64>>;
    /// The product's stock, `None` if it does not exist.
    async fn stock(&mut self, product_id: &str) -> R<Option<i64>>;
    async fn release(&mut self, product_id: &str, quantity: i64) -> R<()>;
    /// `false` if the id exists.
    async fn insert_product(&mut self, p: &Product) -> R<bool>;
    /// The order row (pending, version 1) and its lines.
    async fn insert_order(&mut self, o: &Order) -> R<()>;
    /// `once`: inserts nothing (and says `false`) when the order already has an event of `kind`.
    async fn insert_event(&mut self, order_id: &str, kind: &str, at: i64, cause: Cause<'_>, once: bool) -> R<bool>;
    /// The conditional update of a move; the moved order (without items), or `None`.
    async fn transition(&mut self, id: &str, mv: &Move, now: i64) -> R<Option<Order>>;
    /// `(status, pay_deadline)`, to explain a refusal.
    async fn state(&mut self, id: &str) -> R<Option<(OrderStatus, i64)>>;
    async fn items(&mut self, order_id: &str) -> R<Vec<OrderItem>>;
    /// `(buyer, pay_deadline, total_cents)` while a reminder still makes sense.
    async fn remind_target(&mut self, id: &str, now: i64) -> R<Option<(String, i64, i64)>>;
    async fn insert_outbox(&mut self, topic: &str, payload: &str, now: i64) -> R<()>;
    /// The store's upsert, in this transaction.
    async fn schedule(&mut self, specs: Vec<TimerSpec>, now: i64) -> R<Vec<u64>>;
    /// The store's delete, in this transaction.
    async fn cancel(&mut self, queue: &str, key: &str) -> R<()>;
    async fn commit(self) -> R<()>;
}

/// A deadlock or serialization failure (SQLSTATE class 40): the transaction may simply be run
/// again.
fn is_conflict(e: &OrderError) -> bool {
    let OrderError::Store(overdue::Error::Store { source: Some(source), .. }) = e else { return false };
    source
        .downcast_ref::<sqlx::Error>()
        .and_then(|e| e.as_database_error())
        .and_then(|d| d.code())
        .is_some_and(|c| c.starts_with("40"))
}

/// Maps a driver error to a store error of `backend` (transient: connection trouble, pool
/// timeout, conflicts, server shutting down).
pub(crate) fn db_err(backend: &'static str, e: sqlx::Error) -> overdue::Error {
    let transient = match &e {
        sqlx::Error::Io(_) | sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::Protocol(_) => true,
        sqlx::Error::Database(db) => {
            db.code().is_some_and(|c| c.starts_with("08") || c.starts_with("40") || c.starts_with("53") || c.starts_with("57P"))
        }
        _ => false,
    };
    let message = match &e {
        sqlx::Error::Database(db) => format!("{} ({})", db.message(), db.code().unwrap_or_default()),
        other => other.to_string(),
    };
    overdue::Error::store(backend, message, transient, e)
}

/// Applies `mv` to order `id`; writes nothing unless the order matched.
async fn apply<T: Tx>(
    tx: &mut T,
    id: &str,
    mv: &Move,
    now: i64,
    cause: Cause<'_>,
    schedule_delay_ms: i64,
    with_items: bool,
) -> R<Applied> {
    let Some(mut order) = tx.transition(id, mv, now).await? else {
        return Ok(match tx.state(id).await? {
            Some((status, pay_deadline)) => Applied::Refused { status, pay_deadline },
            None => Applied::Missing,
        });
    };
    tx.insert_event(id, mv.event, now, cause, false).await?;
    let items = if mv.release_stock || with_items { tx.items(id).await? } else { Vec::new() };
    if mv.release_stock {
        for it in &items {
            tx.release(&it.product_id, it.quantity).await?;
        }
    }
    for queue in mv.cancel {
        tx.cancel(queue, id).await?;
    }
    let mut timers = Vec::new();
    if let Some(queue) = mv.schedule {
        let due_at = now.saturating_add(schedule_delay_ms);
        let generations = tx.schedule(vec![TimerSpec::new(queue, id, due_at)], now).await?;
        timers.extend(generations.into_iter().map(|g| timer_ref(queue, id, g, due_at)));
    }
    if with_items {
        order.items = items;
    }
    Ok(Applied::Moved(order, timers))
}

async fn create_order<T: Tx>(mut tx: T, o: &NewOrder, plan: OrderPlan, now: i64) -> Result<(Order, Vec<TimerRef>)> {
    let id = new_id("o", now);
    let deadline = now.saturating_add(plan.pay_timeout_ms);
    // Reserve in product order, so two orders for the same products lock them in one order.
    let mut lines: Vec<(usize, &NewItem)> = o.items.iter().enumerate().collect();
    lines.sort_by(|a, b| a.1.product_id.cmp(&b.1.product_id));
    let mut priced = vec![0i64; o.items.len()];
    for (i, line) in lines {
        let Some(price) = tx.reserve(&line.product_id, line.quantity).await? else {
            // Dropping the transaction rolls the earlier reservations back.
            return Err(match tx.stock(&line.product_id).await? {
                None => OrderError::NotFound { what: "product", id: line.product_id.clone() },
                Some(available) => {
                    OrderError::OutOfStock { product_id: line.product_id.clone(), requested: line.quantity, available }
                }
            });
        };
        priced[i] = price;
    }
    let mut total: i64 = 0;
    let mut items = Vec::with_capacity(o.items.len());
    for (line, price) in o.items.iter().zip(priced) {
        total = price
            .checked_mul(line.quantity)
            .and_then(|t| total.checked_add(t))
            .ok_or_else(|| OrderError::Invalid { field: "items", message: "the order total overflows".into() })?;
        items.push(OrderItem { product_id: line.product_id.clone(), quantity: line.quantity, price_cents: price });
    }
    let order = pending_order(id, o.buyer.clone(), total, deadline, now, items);
    tx.insert_order(&order).await?;
    tx.insert_event(&order.id, "created", now, BY_API, false).await?;
    let specs = order_timers(&order.id, now, deadline, plan.remind_before_ms);
    let generations = tx.schedule(specs.clone(), now).await?;
    tx.commit().await?;
    let timers = specs.into_iter().zip(generations).map(|(s, g)| timer_ref(&s.queue, &s.key, g, s.due_at)).collect();
    Ok((order, timers))
}

async fn api_move<T: Tx>(mut tx: T, id: &str, mv: &Move, delay: i64, now: i64) -> Result<ApiMoved> {
    match apply(&mut tx, id, mv, now, BY_API, delay, true).await? {
        Applied::Moved(order, timers) => {
            tx.commit().await?;
            Ok(ApiMoved::Moved(order, timers))
        }
        Applied::Missing => Err(OrderError::NotFound { what: "order", id: id.to_owned() }),
        Applied::Refused { status, pay_deadline } => match refusal(id, mv, status, pay_deadline, now) {
            Refusal::CloseLate => match apply(&mut tx, id, &CLOSE, now, LATE_PAYMENT, 0, false).await? {
                Applied::Moved(..) => {
                    tx.commit().await?;
                    Ok(ApiMoved::ClosedLate)
                }
                // Under READ COMMITTED the close timer (or a buyer cancel) can commit between our
                // status read and this close: it closed the order, we wrote nothing.
                _ => Err(OrderError::OrderClosed { id: id.to_owned() }),
            },
            Refusal::Error(e) => Err(e),
        },
    }
}

async fn timer_move<T: Tx>(mut tx: T, id: &str, mv: &Move, source: &str, now: i64) -> R<bool> {
    let applied = apply(&mut tx, id, mv, now, Cause { source, detail: None }, 0, false).await?;
    let moved = matches!(applied, Applied::Moved(..));
    if moved {
        tx.commit().await?;
    }
    Ok(moved)
}

async fn remind<T: Tx>(mut tx: T, id: &str, source: &str, now: i64) -> R<bool> {
    let Some((buyer, pay_deadline, total_cents)) = tx.remind_target(id, now).await? else { return Ok(false) };
    if !tx.insert_event(id, "reminded", now, Cause { source, detail: None }, true).await? {
        return Ok(false);
    }
    tx.insert_outbox(TOPIC_REMINDER, &reminder_payload(id, &buyer, pay_deadline, total_cents), now).await?;
    tx.commit().await?;
    Ok(true)
}

/// Runs `f` (one whole transaction) again on a deadlock or serialization failure.
async fn retrying<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Err(e) if attempt < CONFLICT_RETRIES && is_conflict(&e) => {
                attempt += 1;
                tracing::debug!(attempt, error = %e, "order transaction conflicted; running it again");
            }
            other => return other,
        }
    }
}

/// [`retrying`] for flows that answer `overdue::Result` (the timer handlers).
async fn retrying_store<T, F, Fut>(mut f: F) -> R<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = R<T>>,
{
    retrying(|| {
        let fut = f();
        async move { fut.await.map_err(OrderError::Store) }
    })
    .await
    .map_err(|e| match e {
        OrderError::Store(e) => e,
        other => overdue::Error::store("orders", other.to_string(), false, other),
    })
}

/// Writes one backend's `Tx` and [`OrderDb`] for a sqlx driver: `$db` the driver's database
/// type, `$store` the overdue store, `$name` the backend name.
macro_rules! backend {
    ($module:ident, $db:ty, $store:ty, $name:literal, $dialect:expr) => {
        pub(crate) mod $module {
            use super::*;
            use sqlx::Row;

            type Row_ = <$db as sqlx::Database>::Row;
            const BACKEND: &str = $name;

            fn err(e: sqlx::Error) -> overdue::Error {
                db_err(BACKEND, e)
            }

            /// A text column. MySQL reports `utf8mb4_bin` columns as binary, so bytes are accepted
            /// too (and must be UTF-8).
            fn text(r: &Row_, i: usize) -> std::result::Result<String, sqlx::Error> {
                match r.try_get::<String, _>(i) {
                    Ok(s) => Ok(s),
                    Err(sqlx::Error::ColumnDecode { .. }) => {
                        String::from_utf8(r.try_get::<Vec<u8>, _>(i)?).map_err(|e| sqlx::Error::Decode(Box::new(e)))
                    }
                    Err(e) => Err(e),
                }
            }

            /// A nullable text column (see [`text`]).
            fn opt_text(r: &Row_, i: usize) -> std::result::Result<Option<String>, sqlx::Error> {
                match r.try_get::<Option<String>, _>(i) {
                    Ok(s) => Ok(s),
                    Err(sqlx::Error::ColumnDecode { .. }) => r
                        .try_get::<Option<Vec<u8>>, _>(i)?
                        .map(|b| String::from_utf8(b).map_err(|e| sqlx::Error::Decode(Box::new(e))))
                        .transpose(),
                    Err(e) => Err(e),
                }
            }

            fn status(r: &Row_, i: usize) -> std::result::Result<OrderStatus, sqlx::Error> {
                text(r, i)?.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))
            }

            fn order_row(r: &Row_) -> std::result::Result<Order, sqlx::Error> {
                Ok(Order {
                    id: text(r, 0)?,
                    buyer: text(r, 1)?,
                    status: status(r, 2)?,
                    total_cents: r.try_get(3)?,
                    pay_deadline: r.try_get(4)?,
                    created_at: r.try_get(5)?,
                    updated_at: r.try_get(6)?,
                    version: r.try_get(7)?,
                    close_reason: opt_text(r, 8)?,
                    items: Vec::new(),
                })
            }

            fn product_row(r: &Row_) -> std::result::Result<Product, sqlx::Error> {
                Ok(Product {
                    id: text(r, 0)?,
                    name: text(r, 1)?,
                    price_cents: r.try_get(2)?,
                    stock: r.try_get(3)?,
                    stock_total: r.try_get(4)?,
                    created_at: r.try_get(5)?,
                })
            }

            fn item_row(r: &Row_) -> std::result::Result<OrderItem, sqlx::Error> {
                Ok(OrderItem { product_id: text(r, 0)?, quantity: r.try_get(1)?, price_cents: r.try_get(2)? })
            }

            fn all<T>(rows: Vec<Row_>, f: impl Fn(&Row_) -> std::result::Result<T, sqlx::Error>) -> R<Vec<T>> {
                rows.iter().map(f).collect::<std::result::Result<_, _>>().map_err(err)
            }

            /// One transaction of the order service.
            pub(crate) struct DbTx {
                tx: sqlx::Transaction<'static, $db>,
                _permit: tokio::sync::OwnedSemaphorePermit,
                store: $store,
                s: Arc<Stmts>,
            }

            #[async_trait]
            impl Tx for DbTx {
                async fn reserve(&mut self, product_id: &str, quantity: i64) -> R<Option<i64>> {
                    let done = sqlx::query(&self.s.reserve_stock)
                        .bind(quantity)
                        .bind(product_id)
                        .bind(quantity)
                        .execute(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    if done.rows_affected() == 0 {
                        return Ok(None);
                    }
                    let price: i64 = sqlx::query_scalar(&self.s.product_price)
                        .bind(product_id)
                        .fetch_one(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    Ok(Some(price))
                }

                async fn stock(&mut self, product_id: &str) -> R<Option<i64>> {
                    sqlx::query_scalar(&self.s.product_stock).bind(product_id).fetch_optional(&mut *self.tx).await.map_err(err)
                }

                async fn release(&mut self, product_id: &str, quantity: i64) -> R<()> {
                    sqlx::query(&self.s.release_stock)
                        .bind(quantity)
                        .bind(product_id)
                        .execute(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    Ok(())
                }

                async fn insert_product(&mut self, p: &Product) -> R<bool> {
                    let done = sqlx::query(&self.s.insert_product)
                        .bind(&p.id)
                        .bind(&p.name)
                        .bind(p.price_cents)
                        .bind(p.stock)
                        .bind(p.stock_total)
                        .bind(p.created_at)
                        .execute(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn insert_order(&mut self, o: &Order) -> R<()> {
                    sqlx::query(&self.s.insert_order)
                        .bind(&o.id)
                        .bind(&o.buyer)
                        .bind(o.total_cents)
                        .bind(o.pay_deadline)
                        .bind(o.created_at)
                        .bind(o.updated_at)
                        .execute(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    for it in &o.items {
                        sqlx::query(&self.s.insert_item)
                            .bind(&o.id)
                            .bind(&it.product_id)
                            .bind(it.quantity)
                            .bind(it.price_cents)
                            .execute(&mut *self.tx)
                            .await
                            .map_err(err)?;
                    }
                    Ok(())
                }

                async fn insert_event(&mut self, order_id: &str, kind: &str, at: i64, cause: Cause<'_>, once: bool) -> R<bool> {
                    let text = if once { &self.s.insert_event_once } else { &self.s.insert_event };
                    let done = sqlx::query(text)
                        .bind(order_id)
                        .bind(kind)
                        .bind(at)
                        .bind(cause.source)
                        .bind(cause.detail)
                        .execute(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    Ok(done.rows_affected() == 1)
                }

                async fn transition(&mut self, id: &str, mv: &Move, now: i64) -> R<Option<Order>> {
                    let done = sqlx::query(&self.s.transition)
                        .bind(mv.to.as_str())
                        .bind(now)
                        .bind(mv.close_reason)
                        .bind(id)
                        .bind(mv.from[0].as_str())
                        .bind(mv.from[1].as_str())
                        .bind(i64::from(mv.before_deadline))
                        .bind(now)
                        .execute(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    if done.rows_affected() == 0 {
                        return Ok(None);
                    }
                    let row = sqlx::query(&self.s.select_order).bind(id).fetch_one(&mut *self.tx).await.map_err(err)?;
                    order_row(&row).map(Some).map_err(err)
                }

                async fn state(&mut self, id: &str) -> R<Option<(OrderStatus, i64)>> {
                    let row = sqlx::query(&self.s.order_state).bind(id).fetch_optional(&mut *self.tx).await.map_err(err)?;
                    let Some(row) = row else { return Ok(None) };
                    Ok(Some((status(&row, 0).map_err(err)?, row.try_get(1).map_err(err)?)))
                }

                async fn items(&mut self, order_id: &str) -> R<Vec<OrderItem>> {
                    let rows = sqlx::query(&self.s.select_items).bind(order_id).fetch_all(&mut *self.tx).await.map_err(err)?;
                    all(rows, item_row)
                }

                async fn remind_target(&mut self, id: &str, now: i64) -> R<Option<(String, i64, i64)>> {
                    let row = sqlx::query(&self.s.remind_target)
                        .bind(id)
                        .bind(now)
                        .fetch_optional(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    let Some(r) = row else { return Ok(None) };
                    Ok(Some((text(&r, 0).map_err(err)?, r.try_get(1).map_err(err)?, r.try_get(2).map_err(err)?)))
                }

                async fn insert_outbox(&mut self, topic: &str, payload: &str, now: i64) -> R<()> {
                    sqlx::query(&self.s.insert_outbox)
                        .bind(topic)
                        .bind(payload)
                        .bind(now)
                        .execute(&mut *self.tx)
                        .await
                        .map_err(err)?;
                    Ok(())
                }

                async fn schedule(&mut self, specs: Vec<TimerSpec>, now: i64) -> R<Vec<u64>> {
                    self.store.schedule_in(&mut *self.tx, specs, now).await
                }

                async fn cancel(&mut self, queue: &str, key: &str) -> R<()> {
                    self.store.cancel_in(&mut *self.tx, queue, key).await.map(|_| ())
                }

                async fn commit(self) -> R<()> {
                    self.tx.commit().await.map_err(err)
                }
            }

            /// The order service's side of a `$store`.
            pub(crate) struct Db {
                store: $store,
                s: Arc<Stmts>,
                /// Order transactions open at once: the pool's size less [`POOL_RESERVE`], so a
                /// burst of orders queues here (without the pool's acquire timeout) and never
                /// takes the connections the engine's claims and the partition heartbeat need.
                permits: Arc<tokio::sync::Semaphore>,
            }

            impl std::fmt::Debug for Db {
                fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                    f.debug_struct("Db").field("backend", &BACKEND).field("store", &self.store).finish()
                }
            }

            impl Db {
                pub(crate) fn new(store: $store) -> Db {
                    let pool = store.pool().options().get_max_connections() as usize;
                    let permits = Arc::new(tokio::sync::Semaphore::new(pool.saturating_sub(POOL_RESERVE).max(1)));
                    Db { store, s: Arc::new(Stmts::new($dialect)), permits }
                }

                pub(crate) async fn begin(&self) -> R<DbTx> {
                    let permit = Arc::clone(&self.permits)
                        .acquire_owned()
                        .await
                        .map_err(|_| overdue::Error::Config("the order service is shut down".into()))?;
                    let tx = self.store.pool().begin().await.map_err(err)?;
                    Ok(DbTx { tx, _permit: permit, store: self.store.clone(), s: Arc::clone(&self.s) })
                }

                async fn counts(&self, sql: &str) -> Result<Vec<(String, u64)>> {
                    let rows = sqlx::query(sql).fetch_all(self.store.pool()).await.map_err(err)?;
                    Ok(all(rows, |r| Ok((text(r, 0)?, u64::try_from(r.try_get::<i64, _>(1)?).unwrap_or(0))))?)
                }
            }

            #[async_trait]
            impl OrderDb for Db {
                fn name(&self) -> &'static str {
                    BACKEND
                }

                async fn create_product(&self, p: NewProduct, clock: Arc<dyn Clock>) -> Result<Product> {
                    retrying(|| async {
                        let mut tx = self.begin().await?;
                        let now = clock.now_ms();
                        let id = p.id.clone().unwrap_or_else(|| new_id("p", now));
                        let product = Product {
                            id,
                            name: p.name.clone(),
                            price_cents: p.price_cents,
                            stock: p.stock,
                            stock_total: p.stock,
                            created_at: now,
                        };
                        if !tx.insert_product(&product).await? {
                            return Err(OrderError::AlreadyExists { what: "product", id: product.id });
                        }
                        tx.commit().await?;
                        Ok(product)
                    })
                    .await
                }

                async fn create_order(&self, o: NewOrder, plan: OrderPlan, clock: Arc<dyn Clock>) -> Result<(Order, Vec<TimerRef>)> {
                    retrying(|| async { create_order(self.begin().await?, &o, plan, clock.now_ms()).await }).await
                }

                async fn api_move(&self, id: String, mv: Move, delay: i64, clock: Arc<dyn Clock>) -> Result<ApiMoved> {
                    retrying(|| async {
                        let tx = self.begin().await?;
                        api_move(tx, &id, &mv, delay, clock.now_ms()).await
                    })
                    .await
                }

                async fn timer_move(&self, id: String, mv: Move, source: String, clock: Arc<dyn Clock>) -> R<bool> {
                    retrying_store(|| async {
                        let tx = self.begin().await?;
                        timer_move(tx, &id, &mv, &source, clock.now_ms()).await
                    })
                    .await
                }

                async fn remind(&self, id: String, source: String, clock: Arc<dyn Clock>) -> R<bool> {
                    retrying_store(|| async {
                        let tx = self.begin().await?;
                        remind(tx, &id, &source, clock.now_ms()).await
                    })
                    .await
                }

                async fn outbox_delivered(&self, ids: Vec<i64>, now: i64) -> Result<()> {
                    let mut tx = self.begin().await?;
                    for id in &ids {
                        sqlx::query(&self.s.outbox_delivered).bind(now).bind(id).execute(&mut *tx.tx).await.map_err(err)?;
                    }
                    Ok(tx.commit().await?)
                }

                async fn outbox_failed(&self, id: i64) -> Result<()> {
                    let done = sqlx::query(&self.s.outbox_failed).bind(id).execute(self.store.pool()).await.map_err(err)?;
                    if done.rows_affected() == 0 {
                        return Err(OrderError::NotFound { what: "outbox message", id: id.to_string() });
                    }
                    Ok(())
                }

                async fn product(&self, id: String) -> Result<Product> {
                    let row = sqlx::query(&self.s.select_product).bind(&id).fetch_optional(self.store.pool()).await.map_err(err)?;
                    let row = row.ok_or(OrderError::NotFound { what: "product", id })?;
                    Ok(product_row(&row).map_err(err)?)
                }

                async fn products(&self, after: String, limit: u32) -> Result<Vec<Product>> {
                    let rows = sqlx::query(&self.s.list_products)
                        .bind(after)
                        .bind(i64::from(limit))
                        .fetch_all(self.store.pool())
                        .await
                        .map_err(err)?;
                    Ok(all(rows, product_row)?)
                }

                async fn order(&self, id: String) -> Result<Order> {
                    // Lines are written in the order's own transaction: once the order is
                    // visible, so are its lines.
                    let row = sqlx::query(&self.s.select_order).bind(&id).fetch_optional(self.store.pool()).await.map_err(err)?;
                    let row = row.ok_or_else(|| OrderError::NotFound { what: "order", id: id.clone() })?;
                    let mut order = order_row(&row).map_err(err)?;
                    let rows = sqlx::query(&self.s.select_items).bind(&id).fetch_all(self.store.pool()).await.map_err(err)?;
                    order.items = all(rows, item_row)?;
                    Ok(order)
                }

                async fn events(&self, id: String) -> Result<Vec<OrderEvent>> {
                    let exists = sqlx::query(&self.s.order_state).bind(&id).fetch_optional(self.store.pool()).await.map_err(err)?;
                    if exists.is_none() {
                        return Err(OrderError::NotFound { what: "order", id });
                    }
                    let rows = sqlx::query(&self.s.select_events).bind(&id).fetch_all(self.store.pool()).await.map_err(err)?;
                    Ok(all(rows, |r| {
                        Ok(OrderEvent { kind: text(r, 0)?, at: r.try_get(1)?, source: text(r, 2)?, detail: opt_text(r, 3)? })
                    })?)
                }

                async fn orders(&self, q: OrderQuery, limit: u32) -> Result<Vec<Order>> {
                    let text = self.s.list_orders(&q);
                    let mut query = sqlx::query(&text);
                    if let Some(s) = q.status {
                        query = query.bind(s.as_str());
                    }
                    if let Some(b) = &q.buyer {
                        query = query.bind(b);
                    }
                    if let Some(b) = &q.before {
                        query = query.bind(b);
                    }
                    let rows = query.bind(i64::from(limit)).fetch_all(self.store.pool()).await.map_err(err)?;
                    let mut out = all(rows, order_row)?;
                    for o in &mut out {
                        let rows = sqlx::query(&self.s.select_items).bind(&o.id).fetch_all(self.store.pool()).await.map_err(err)?;
                        o.items = all(rows, item_row)?;
                    }
                    Ok(out)
                }

                async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxMessage>> {
                    let rows = sqlx::query(&self.s.outbox_pending)
                        .bind(i64::from(limit))
                        .fetch_all(self.store.pool())
                        .await
                        .map_err(err)?;
                    Ok(all(rows, |r| {
                        Ok(OutboxMessage {
                            id: r.try_get(0)?,
                            topic: text(r, 1)?,
                            payload: text(r, 2)?,
                            created_at: r.try_get(3)?,
                            attempts: u32::try_from(r.try_get::<i32, _>(4)?.max(0)).unwrap_or(0),
                        })
                    })?)
                }

                async fn transition_counts(&self) -> Result<Vec<(String, u64)>> {
                    self.counts(&self.s.transition_counts).await
                }

                async fn status_counts(&self) -> Result<Vec<(String, u64)>> {
                    self.counts(&self.s.status_counts).await
                }

                async fn invariants(&self, now: i64, bound_ms: i64) -> Result<InvariantReport> {
                    // One snapshot for the three queries.
                    let mut tx = self.store.pool().begin().await.map_err(err)?;
                    if $dialect == Dialect::Postgres {
                        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                            .execute(&mut *tx)
                            .await
                            .map_err(err)?;
                    }
                    let mut report = InvariantReport::default();
                    let rows = sqlx::query(&self.s.invariant_stock).fetch_all(&mut *tx).await.map_err(err)?;
                    for r in rows {
                        let id = text(&r, 0).map_err(err)?;
                        let (stock, total, held): (i64, i64, i64) =
                            (r.try_get(1).map_err(err)?, r.try_get(2).map_err(err)?, r.try_get(3).map_err(err)?);
                        tracing::warn!(product = %id, stock, stock_total = total, held, "stock is not conserved");
                        push_capped(&mut report.stock_mismatches, id);
                    }
                    let rows = sqlx::query(&self.s.invariant_orders).fetch_all(&mut *tx).await.map_err(err)?;
                    for r in rows {
                        let facts = OrderFacts {
                            id: text(&r, 0).map_err(err)?,
                            status: status(&r, 1).map_err(err)?,
                            version: r.try_get(2).map_err(err)?,
                            close_reason: opt_text(&r, 3).map_err(err)?,
                            pay_deadline: r.try_get(4).map_err(err)?,
                            mask: r.try_get(5).map_err(err)?,
                        };
                        judge(&mut report, facts, now, bound_ms);
                    }
                    let rows = sqlx::query(&self.s.invariant_orphans).fetch_all(&mut *tx).await.map_err(err)?;
                    for r in rows {
                        push_capped(&mut report.inconsistent, text(&r, 0).map_err(err)?);
                    }
                    tx.rollback().await.map_err(err)?;
                    Ok(report)
                }
            }
        }
    };
}

#[cfg(feature = "postgres")]
backend!(pg, sqlx::Postgres, overdue_postgres::PgStore, "postgres", Dialect::Postgres);
#[cfg(feature = "mysql")]
backend!(my, sqlx::MySql, overdue_mysql::MysqlStore, "mysql", Dialect::Mysql);

/// Lock key of the order-schema migration on PostgreSQL (`pg_advisory_xact_lock`), distinct
/// from the timer store's.
#[cfg(feature = "postgres")]
const PG_MIGRATION_LOCK: i64 = 0x6f72_6465_7273; // "orders"

/// The order service on a [`overdue_postgres::PgStore`]: migrates the order tables (one
/// transaction, under an advisory lock) into the store's schema.
#[cfg(feature = "postgres")]
pub(crate) async fn postgres(store: overdue_postgres::PgStore, now: i64) -> Result<pg::Db> {
    let err = |e| OrderError::Store(db_err("postgres", e));
    let mut tx = store.pool().begin().await.map_err(err)?;
    sqlx::query("SELECT pg_advisory_xact_lock($1)").bind(PG_MIGRATION_LOCK).execute(&mut *tx).await.map_err(err)?;
    sqlx::raw_sql(schema::version_table(Dialect::Postgres)).execute(&mut *tx).await.map_err(err)?;
    let found: Option<i32> =
        sqlx::query_scalar("SELECT MAX(version) FROM order_schema_version").fetch_one(&mut *tx).await.map_err(err)?;
    let found = check_version(found.map(i64::from))?;
    for step in schema::migrations(Dialect::Postgres).iter().filter(|m| m.version > found) {
        sqlx::raw_sql(step.sql).execute(&mut *tx).await.map_err(err)?;
        sqlx::query("INSERT INTO order_schema_version (version, name, applied_at) VALUES ($1, $2, $3)")
            .bind(step.version as i32)
            .bind(step.name)
            .bind(now)
            .execute(&mut *tx)
            .await
            .map_err(err)?;
        tracing::info!(version = step.version, name = step.name, "applied order schema migration (postgres)");
    }
    tx.commit().await.map_err(err)?;
    Ok(pg::Db::new(store))
}

/// The order service on a [`overdue_mysql::MysqlStore`]: migrates the order tables under
/// `GET_LOCK` (MySQL commits each DDL statement by itself; every statement of a step is safe to
/// run again, see [`crate::schema`]).
#[cfg(feature = "mysql")]
pub(crate) async fn mysql(store: overdue_mysql::MysqlStore, now: i64) -> Result<my::Db> {
    let err = |e| OrderError::Store(db_err("mysql", e));
    let mut conn = store.pool().acquire().await.map_err(err)?;
    let got: Option<i64> = sqlx::query_scalar("SELECT CAST(GET_LOCK('overdue_orders_migrate', 30) AS SIGNED)")
        .fetch_one(&mut *conn)
        .await
        .map_err(err)?;
    if got != Some(1) {
        return Err(OrderError::Store(overdue::Error::store(
            "mysql",
            "timed out after 30 s waiting for another node's order-schema migration (GET_LOCK('overdue_orders_migrate'))",
            true,
            std::io::Error::other("lock wait timed out"),
        )));
    }
    let result = async {
        sqlx::query(schema::version_table(Dialect::Mysql)).execute(&mut *conn).await.map_err(err)?;
        let found: Option<i64> = sqlx::query_scalar("SELECT CAST(MAX(version) AS SIGNED) FROM order_schema_version")
            .fetch_one(&mut *conn)
            .await
            .map_err(err)?;
        let found = check_version(found)?;
        for step in schema::migrations(Dialect::Mysql).iter().filter(|m| m.version > found) {
            for statement in step.sql.split(';').map(str::trim).filter(|s| !s.is_empty()) {
                sqlx::query(statement).execute(&mut *conn).await.map_err(err)?;
            }
            sqlx::query("INSERT IGNORE INTO order_schema_version (version, name, applied_at) VALUES (?, ?, ?)")
                .bind(step.version)
                .bind(step.name)
                .bind(now)
                .execute(&mut *conn)
                .await
                .map_err(err)?;
            tracing::info!(version = step.version, name = step.name, "applied order schema migration (mysql)");
        }
        Ok::<_, OrderError>(())
    }
    .await;
    let released = sqlx::query("DO RELEASE_LOCK('overdue_orders_migrate')").execute(&mut *conn).await.map_err(err);
    result?;
    released?;
    Ok(my::Db::new(store))
}

/// The recorded order-schema version, refused when newer than this build.
#[cfg(any(feature = "postgres", feature = "mysql"))]
fn check_version(found: Option<i64>) -> Result<u32> {
    let found = u32::try_from(found.unwrap_or(0)).unwrap_or(u32::MAX);
    let latest = schema::latest_version();
    if found > latest {
        return Err(OrderError::Store(overdue::Error::Config(format!(
            "the database has order schema version {found}, newer than the version {latest} this \
             build understands; upgrade overdue or open another database"
        ))));
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_for_postgres_only() {
        assert_eq!(numbered("a = ? AND b IN (?, ?)"), "a = $1 AND b IN ($2, $3)");
        let pg = Stmts::new(Dialect::Postgres);
        let my = Stmts::new(Dialect::Mysql);
        assert!(pg.transition.contains("$8") && !pg.transition.contains('?'), "{}", pg.transition);
        assert_eq!(my.transition.matches('?').count(), 8);
        assert!(pg.insert_event_once.contains("ON CONFLICT (order_id, kind) DO NOTHING"));
        assert!(my.insert_event_once.starts_with("INSERT IGNORE"));
        let q = OrderQuery { status: Some(OrderStatus::Paid), buyer: None, before: Some("o-1".into()), limit: 0 };
        assert!(pg.list_orders(&q).ends_with("WHERE status = $1 AND id < $2 ORDER BY id DESC LIMIT $3"));
    }
}
