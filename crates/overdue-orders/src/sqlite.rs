//! The order service on the embedded SQLite store: every write is a closure on the store's
//! writer thread (group-committed with the engine's own writes), every read on the service's
//! read-only connections (`read`).
//!
//! Closures that can be refused only before their first change (one-line orders, transitions,
//! the timer handlers) run through [`SqliteStore::write_without_savepoint`]; multi-line orders,
//! whose third line may be out of stock after two were reserved, through [`SqliteStore::write`].
//! A domain error found half way travels out of the closure inside the store error
//! ([`abort`]) and comes back out as the [`OrderError`] it was ([`recover`]).

use std::collections::HashMap;
use std::sync::Arc;

use async_trait::async_trait;
use futures::{StreamExt, TryStreamExt};
use overdue::{Clock, TimerRef, TimerSpec};
use overdue_sql::{SqlResultExt, SqliteStore, WriteCtx};
use rusqlite::{Connection, OptionalExtension, params};

use crate::db::{ApiMoved, OrderDb, OrderPlan};
use crate::error::{OrderError, Result};
use crate::machine::*;
use crate::model::*;
use crate::read::{self, ReadPool};
use crate::{schema, sql};

/// Where the timers of an order change are written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum TimerHome {
    /// In the same SQLite store, same transaction (the engine runs on this store).
    Here,
    /// As rows of `order_timer_outbox`, same transaction; [`SqliteDb::relay_timers`] applies them to
    /// the engine's store (Redis) afterwards. See `docs/orders.md`, "Timers in another store".
    Outbox,
}

/// The SQLite side of [`crate::OrderService`].
#[derive(Debug)]
pub(crate) struct SqliteDb {
    store: SqliteStore,
    readers: Arc<ReadPool>,
    home: TimerHome,
    /// Woken after a write that left rows in `order_timer_outbox`.
    relay_wake: Arc<tokio::sync::Notify>,
    /// One relay pass at a time: two passes reading the same rows could otherwise apply an
    /// older schedule after a newer pass already applied its cancel.
    relay_lock: tokio::sync::Mutex<()>,
}

/// Timer changes relayed per pass.
const RELAY_BATCH: usize = 1000;
/// Cancels a relay pass keeps in flight at once (the Redis client pipelines them).
const RELAY_CANCELS_IN_FLIGHT: usize = 64;

/// Schedules `specs` where `home` says; the refs to track (none for the outbox: the relay
/// tracks what it applied). `or_fail`: fail the write on an invalid timer (an order's own).
fn schedule(ctx: &mut WriteCtx<'_, '_>, home: TimerHome, specs: &[TimerSpec], now: i64, or_fail: bool) -> overdue::Result<Vec<TimerRef>> {
    match home {
        TimerHome::Here => {
            let generations = if or_fail { ctx.schedule_or_fail(specs, now)? } else { ctx.schedule(specs, now)? };
            Ok(specs.iter().zip(generations).map(|(s, g)| timer_ref(&s.queue, &s.key, g, s.due_at)).collect())
        }
        TimerHome::Outbox => {
            let mut insert = ctx.prepare(sql::TIMER_OUTBOX_INSERT).store_err("write timer outbox")?;
            for s in specs {
                insert.execute(params!["schedule", s.queue, s.key, s.due_at, now]).store_err("write timer outbox")?;
            }
            Ok(Vec::new())
        }
    }
}

/// Cancels a timer where `home` says.
fn cancel(ctx: &mut WriteCtx<'_, '_>, home: TimerHome, queue: &str, key: &str, now: i64) -> overdue::Result<()> {
    match home {
        TimerHome::Here => ctx.remove(queue, key).map(|_| ()),
        TimerHome::Outbox => ctx
            .prepare(sql::TIMER_OUTBOX_INSERT)
            .and_then(|mut s| s.execute(params!["cancel", queue, key, Option::<i64>::None, now]))
            .map(|_| ())
            .store_err("write timer outbox"),
    }
}

/// One row of `order_timer_outbox`.
#[derive(Debug)]
struct Intent {
    id: i64,
    schedule: bool,
    queue: String,
    key: String,
    due_at: i64,
}

impl SqliteDb {
    /// Applies the order migrations (in one store write) and opens the read connections.
    pub(crate) async fn open(store: SqliteStore, home: TimerHome, now: i64) -> Result<SqliteDb> {
        let found = store.write(move |ctx| schema::migrate_sqlite(ctx.connection(), now)).await.map_err(recover)?;
        let path = store.path().to_path_buf();
        let readers = tokio::task::spawn_blocking(move || ReadPool::open(path, read::READERS))
            .await
            .map_err(|e| OrderError::Store(overdue::Error::store("sqlite", format!("opening readers failed: {e}"), false, e)))??;
        tracing::info!(db = %store.path().display(), schema_found = found, schema = schema::latest_version(), "order tables ready");
        Ok(SqliteDb { store, readers: Arc::new(readers), home, relay_wake: Arc::new(tokio::sync::Notify::new()), relay_lock: tokio::sync::Mutex::new(()) })
    }

    /// Wakes the relay when this database keeps its timers in the outbox.
    fn wake_relay(&self) {
        if self.home == TimerHome::Outbox {
            self.relay_wake.notify_one();
        }
    }

    /// One relay pass: applies the oldest timer changes of `order_timer_outbox` to `target` (the
    /// last change of each timer wins, as if applied in write order), then deletes them.
    /// A crash between the two applies them again at the next pass: an upsert and a cancel are
    /// both safe to repeat. Returns the refs scheduled (to track) and how many rows were done.
    async fn relay(&self, target: &dyn overdue::Store, now: i64) -> overdue::Result<(Vec<TimerRef>, usize)> {
        let _one_at_a_time = self.relay_lock.lock().await;
        let intents = self
            .read(|c| {
                let mut stmt = c.prepare_cached(sql::TIMER_OUTBOX_PENDING).store_err("read timer outbox")?;
                let rows = stmt
                    .query_map([RELAY_BATCH as i64], |r| {
                        Ok(Intent {
                            id: r.get(0)?,
                            schedule: r.get::<_, String>(1)? == "schedule",
                            queue: r.get(2)?,
                            key: r.get(3)?,
                            due_at: r.get::<_, Option<i64>>(4)?.unwrap_or(0),
                        })
                    })
                    .store_err("read timer outbox")?;
                Ok(rows.collect::<rusqlite::Result<Vec<_>>>().store_err("read timer outbox")?)
            })
            .await
            .map_err(|e| match e {
                OrderError::Store(e) => e,
                other => overdue::Error::store("orders", other.to_string(), false, other),
            })?;
        let Some(last) = intents.last().map(|i| i.id) else { return Ok((Vec::new(), 0)) };
        // Only the last change of each timer matters: a schedule is an upsert (it replaces
        // whatever came before), a cancel deletes whatever came before. So the batch collapses
        // to one final change per timer, and those touch distinct timers: all schedules go in
        // one batched call, the cancels run concurrently.
        let mut finals: HashMap<(&str, &str), &Intent> = HashMap::with_capacity(intents.len());
        for intent in &intents {
            finals.insert((intent.queue.as_str(), intent.key.as_str()), intent);
        }
        let (schedules, cancels): (Vec<&Intent>, Vec<&Intent>) = finals.into_values().partition(|i| i.schedule);
        let specs: Vec<TimerSpec> =
            schedules.iter().map(|i| TimerSpec::new(i.queue.clone(), i.key.clone(), i.due_at)).collect();
        let mut refs = Vec::with_capacity(specs.len());
        if !specs.is_empty() {
            let generations = target.schedule(specs.clone(), now).await?;
            refs.extend(specs.iter().zip(generations).map(|(s, g)| timer_ref(&s.queue, &s.key, g, s.due_at)));
        }
        let mut pending = Vec::with_capacity(cancels.len());
        for i in &cancels {
            pending.push(target.cancel(&i.queue, &i.key));
        }
        futures::stream::iter(pending)
            .buffer_unordered(RELAY_CANCELS_IN_FLIGHT)
            .try_collect::<Vec<_>>()
            .await?;
        self.store
            .write(move |ctx| {
                ctx.prepare(sql::TIMER_OUTBOX_DONE)
                    .and_then(|mut s| s.execute([last]))
                    .store_err("clear timer outbox")
            })
            .await?;
        Ok((refs, intents.len()))
    }

    async fn read<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T> + Send + 'static,
    {
        self.readers.read(f).await
    }
}

/// Applies `mv` to order `id` inside a write closure. Writes nothing unless the order matched.
/// Reads nothing back: a timer handler needs only whether the order moved, and the API reads
/// the moved order itself ([`moved_order`]).
fn apply(
    ctx: &mut WriteCtx<'_, '_>,
    home: TimerHome,
    id: &str,
    mv: &Move,
    now: i64,
    cause: Cause<'_>,
    schedule_delay_ms: i64,
) -> overdue::Result<Applied<()>> {
    let changed = ctx
        .prepare(sql::TRANSITION)
        .and_then(|mut s| {
            s.execute(params![id, mv.to, now, mv.close_reason, mv.from[0], mv.from[1], i64::from(mv.before_deadline)])
        })
        .store_err(mv.action)?;
    if changed == 0 {
        let state = ctx
            .prepare(sql::ORDER_STATE)
            .and_then(|mut s| s.query_row([id], |r| Ok((r.get::<_, OrderStatus>(0)?, r.get::<_, i64>(1)?))).optional())
            .store_err(mv.action)?;
        return Ok(match state {
            Some((status, pay_deadline)) => Applied::Refused { status, pay_deadline },
            None => Applied::Missing,
        });
    }
    ctx.prepare(sql::INSERT_EVENT)
        .and_then(|mut s| s.execute(params![id, mv.event, now, cause.source, cause.detail]))
        .store_err("record order event")?;
    if mv.release_stock {
        let items = read::items(ctx.connection(), id)?;
        let mut release = ctx.prepare(sql::RELEASE_STOCK).store_err("release stock")?;
        for it in &items {
            release.execute(params![it.product_id, it.quantity]).store_err("release stock")?;
        }
    }
    for queue in mv.cancel {
        cancel(ctx, home, queue, id, now)?;
    }
    let mut timers = Vec::new();
    if let Some(queue) = mv.schedule {
        let due_at = now.saturating_add(schedule_delay_ms);
        timers = schedule(ctx, home, &[TimerSpec::new(queue, id, due_at)], now, false)?;
    }
    Ok(Applied::Moved((), timers))
}

/// The order `apply` just moved, with its items, read inside the same write.
fn moved_order(ctx: &mut WriteCtx<'_, '_>, id: &str, action: &str) -> overdue::Result<Order> {
    let mut order = ctx.prepare(sql::SELECT_ORDER).and_then(|mut s| s.query_row([id], read::order_row)).store_err(action)?;
    order.items = read::items(ctx.connection(), id)?;
    Ok(order)
}

/// Wakes the relay when a write that may have left timer changes is done (committed or not).
struct WakeOnDrop<'a>(&'a SqliteDb);

impl Drop for WakeOnDrop<'_> {
    fn drop(&mut self) {
        self.0.wake_relay();
    }
}

#[async_trait]
impl OrderDb for SqliteDb {
    fn name(&self) -> &'static str {
        match self.home {
            TimerHome::Here => "sqlite",
            TimerHome::Outbox => "sqlite (timers relayed)",
        }
    }

    fn relay_wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        (self.home == TimerHome::Outbox).then(|| Arc::clone(&self.relay_wake))
    }

    async fn relay_timers(&self, target: &dyn overdue::Store, now: i64) -> overdue::Result<(Vec<TimerRef>, usize)> {
        if self.home == TimerHome::Here {
            return Ok((Vec::new(), 0));
        }
        self.relay(target, now).await
    }

    async fn create_product(&self, p: NewProduct, clock: Arc<dyn Clock>) -> Result<Product> {
        self.store
            .write(move |ctx| {
                let now = clock.now_ms();
                let id = p.id.clone().unwrap_or_else(|| new_id("p", now));
                let inserted = ctx
                    .prepare(sql::INSERT_PRODUCT)
                    .and_then(|mut s| s.execute(params![id, p.name, p.price_cents, p.stock, now]))
                    .store_err("insert product")?;
                if inserted == 0 {
                    return Err(abort(OrderError::AlreadyExists { what: "product", id }));
                }
                Ok(Product { id, name: p.name, price_cents: p.price_cents, stock: p.stock, stock_total: p.stock, created_at: now })
            })
            .await
            .map_err(recover)
    }

    async fn create_order(&self, o: NewOrder, plan: OrderPlan, clock: Arc<dyn Clock>) -> Result<(Order, Vec<TimerRef>)> {
        // A one-line order can only be refused by its reservation, its first write: it needs no
        // savepoint (see `SqliteStore::write_without_savepoint`). More lines need one, to undo
        // the lines already reserved when a later one is out of stock.
        let single_line = o.items.len() == 1;
        let (pay_timeout, remind_before) = (plan.pay_timeout_ms, plan.remind_before_ms);
        let home = self.home;
        let job = move |ctx: &mut WriteCtx<'_, '_>| {
                let now = clock.now_ms();
                let id = new_id("o", now);
                let deadline = now.saturating_add(pay_timeout);
                let mut items = Vec::with_capacity(o.items.len());
                let mut total: i64 = 0;
                {
                    let mut reserve = ctx.prepare(sql::RESERVE_STOCK).store_err("reserve stock")?;
                    let mut price_of = ctx.prepare(sql::PRODUCT_PRICE).store_err("reserve stock")?;
                    for line in &o.items {
                        let reserved = reserve.execute(params![line.product_id, line.quantity]).store_err("reserve stock")?;
                        let price = if reserved == 0 {
                            None
                        } else {
                            Some(price_of.query_row([&line.product_id], |r| r.get::<_, i64>(0)).store_err("reserve stock")?)
                        };
                        let Some(price) = price else {
                            let available = ctx
                                .prepare(sql::PRODUCT_STOCK)
                                .and_then(|mut s| s.query_row([&line.product_id], |r| r.get::<_, i64>(0)).optional())
                                .store_err("read stock")?;
                            return Err(abort(match available {
                                None => OrderError::NotFound { what: "product", id: line.product_id.clone() },
                                Some(available) => OrderError::OutOfStock {
                                    product_id: line.product_id.clone(),
                                    requested: line.quantity,
                                    available,
                                },
                            }));
                        };
                        total = price
                            .checked_mul(line.quantity)
                            .and_then(|line_total| total.checked_add(line_total))
                            .ok_or_else(|| abort(OrderError::Invalid { field: "items", message: "the order total overflows".into() }))?;
                        items.push(OrderItem { product_id: line.product_id.clone(), quantity: line.quantity, price_cents: price });
                    }
                }
                ctx.prepare(sql::INSERT_ORDER)
                    .and_then(|mut s| s.execute(params![id, o.buyer, total, deadline, now]))
                    .store_err("insert order")?;
                {
                    let mut insert = ctx.prepare(sql::INSERT_ITEM).store_err("insert order item")?;
                    for it in &items {
                        insert.execute(params![id, it.product_id, it.quantity, it.price_cents]).store_err("insert order item")?;
                    }
                }
                ctx.prepare(sql::INSERT_EVENT)
                    .and_then(|mut s| s.execute(params![id, "created", now, SOURCE_API, Option::<String>::None]))
                    .store_err("record order event")?;
                let specs = order_timers(&id, now, deadline, remind_before);
                // The closure returns the error, so its savepoint undoes everything on failure.
                let timers = schedule(ctx, home, &specs, now, true)?;
                let order = pending_order(id, o.buyer, total, deadline, now, items);
                Ok((order, timers))
            };
        let written = if single_line { self.store.write_without_savepoint(job).await } else { self.store.write(job).await };
        self.wake_relay();
        written.map_err(recover)
    }

    async fn api_move(&self, id: String, mv: Move, delay: i64, clock: Arc<dyn Clock>) -> Result<ApiMoved> {
        // `apply` writes nothing unless the transition matched, and every refusal returns before
        // that: no savepoint needed.
        let home = self.home;
        let _wake = WakeOnDrop(self);
        self.store
            .write_without_savepoint(move |ctx| {
                let now = clock.now_ms();
                match apply(ctx, home, &id, &mv, now, BY_API, delay)? {
                    Applied::Moved((), timers) => Ok(ApiMoved::Moved(moved_order(ctx, &id, mv.action)?, timers)),
                    Applied::Missing => Err(abort(OrderError::NotFound { what: "order", id })),
                    Applied::Refused { status, pay_deadline } => match refusal(&id, &mv, status, pay_deadline, now) {
                        // One writer: nothing can close the order between the read and this close,
                        // but only a close that happened is reported (and counted) as one.
                        Refusal::CloseLate => match apply(ctx, home, &id, &CLOSE, now, LATE_PAYMENT, 0)? {
                            Applied::Moved(..) => Ok(ApiMoved::ClosedLate),
                            _ => Err(abort(OrderError::OrderClosed { id })),
                        },
                        Refusal::Error(e) => Err(abort(e)),
                    },
                }
            })
            .await
            .map_err(recover)
    }

    async fn timer_move(&self, id: String, mv: Move, source: String, clock: Arc<dyn Clock>) -> overdue::Result<bool> {
        let home = self.home;
        let _wake = WakeOnDrop(self);
        self.store
            .write_without_savepoint(move |ctx| {
                let now = clock.now_ms();
                let applied = apply(ctx, home, &id, &mv, now, Cause { source: &source, detail: None }, 0)?;
                Ok(matches!(applied, Applied::Moved(..)))
            })
            .await
    }

    async fn remind(&self, id: String, source: String, clock: Arc<dyn Clock>) -> overdue::Result<bool> {
        // The event insert is the first change; nothing refuses after it: no savepoint needed.
        self.store
            .write_without_savepoint(move |ctx| {
                let now = clock.now_ms();
                let target = ctx
                    .prepare(sql::REMIND_TARGET)
                    .and_then(|mut s| {
                        s.query_row(params![id, now], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?, r.get::<_, i64>(2)?)))
                            .optional()
                    })
                    .store_err("read order for reminder")?;
                let Some((buyer, pay_deadline, total_cents)) = target else { return Ok(false) };
                let inserted = ctx
                    .prepare(sql::INSERT_EVENT_ONCE)
                    .and_then(|mut s| s.execute(params![id, "reminded", now, source, Option::<String>::None]))
                    .store_err("record reminder")?;
                if inserted == 0 {
                    return Ok(false);
                }
                let payload = reminder_payload(&id, &buyer, pay_deadline, total_cents);
                ctx.prepare(sql::INSERT_OUTBOX)
                    .and_then(|mut s| s.execute(params![TOPIC_REMINDER, payload, now]))
                    .store_err("write reminder to the outbox")?;
                Ok(true)
            })
            .await
    }

    async fn outbox_delivered(&self, ids: Vec<i64>, now: i64) -> Result<()> {
        self.store
            .write(move |ctx| {
                let mut stmt = ctx.prepare(sql::OUTBOX_DELIVERED).store_err("ack outbox")?;
                for id in &ids {
                    stmt.execute(params![id, now]).store_err("ack outbox")?;
                }
                Ok(())
            })
            .await
            .map_err(recover)
    }

    async fn outbox_failed(&self, id: i64) -> Result<()> {
        self.store
            .write(move |ctx| {
                let n = ctx
                    .prepare(sql::OUTBOX_FAILED)
                    .and_then(|mut s| s.execute([id]))
                    .store_err("count outbox failure")?;
                if n == 0 {
                    return Err(abort(OrderError::NotFound { what: "outbox message", id: id.to_string() }));
                }
                Ok(())
            })
            .await
            .map_err(recover)
    }

    async fn product(&self, id: String) -> Result<Product> {
        self.read(move |c| read::product(c, &id)).await
    }

    async fn products(&self, after: String, limit: u32) -> Result<Vec<Product>> {
        self.read(move |c| read::products(c, &after, limit)).await
    }

    async fn order(&self, id: String) -> Result<Order> {
        self.read(move |c| read::order(c, &id)).await
    }

    async fn events(&self, id: String) -> Result<Vec<OrderEvent>> {
        self.read(move |c| read::events(c, &id)).await
    }

    async fn orders(&self, q: OrderQuery, limit: u32) -> Result<Vec<Order>> {
        self.read(move |c| read::orders(c, &q, limit)).await
    }

    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxMessage>> {
        self.read(move |c| read::outbox_pending(c, limit)).await
    }

    async fn transition_counts(&self) -> Result<Vec<(String, u64)>> {
        self.read(|c| read::transition_counts(c)).await
    }

    async fn status_counts(&self) -> Result<Vec<(String, u64)>> {
        self.read(|c| read::status_counts(c)).await
    }

    async fn invariants(&self, now: i64, bound_ms: i64) -> Result<InvariantReport> {
        self.read(move |c| read::invariants(c, now, bound_ms)).await
    }
}
