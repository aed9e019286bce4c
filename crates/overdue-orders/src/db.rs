//! [`OrderDb`]: what the service needs from the database its orders live in, one implementation
//! per backend (`sqlite`: the embedded store's writer thread; `sqlx_db`: PostgreSQL and MySQL).
//!
//! Every write method is **one transaction** holding the order rows *and* the timer rows they
//! imply (the timer tables are in the same database), so an order never exists without its
//! close timer. The state machine itself ([`crate::machine`]) is shared; a backend only says how
//! to run its statements. Inputs arrive validated by [`crate::service`].

use std::sync::Arc;

use async_trait::async_trait;
use overdue::{Clock, TimerRef};

use crate::error::Result;
use crate::machine::Move;
use crate::model::*;

/// What [`OrderDb::create_order`] needs besides the order: its timing, already validated.
#[derive(Clone, Copy, Debug)]
pub(crate) struct OrderPlan {
    pub(crate) pay_timeout_ms: i64,
    pub(crate) remind_before_ms: i64,
}

/// What an API move committed. A payment at or after the deadline of a still-pending order
/// closes it (reason `timeout`) and is refused: [`ApiMoved::ClosedLate`], which the service turns
/// into [`crate::OrderError::OrderClosed`] after counting the `closed` transition it committed.
#[derive(Debug)]
pub(crate) enum ApiMoved {
    /// The move applied: the order (with items) and the timers it scheduled.
    Moved(Order, Vec<TimerRef>),
    /// The payment came too late; the order was closed in its place.
    ClosedLate,
}

/// One backend's statements for the order service. "now" is read from the clock *inside* the
/// transaction, so a payment is judged at the moment it is applied, after any queueing.
#[async_trait]
pub(crate) trait OrderDb: Send + Sync + std::fmt::Debug + 'static {
    /// `sqlite`, `postgres` or `mysql`, for logs.
    fn name(&self) -> &'static str;

    /// When the timers are relayed to another store: what a write that left timer changes
    /// wakes. `None` (the default) when they are written beside the orders.
    fn relay_wake(&self) -> Option<Arc<tokio::sync::Notify>> {
        None
    }

    /// One relay pass to `target` (see `sqlite::SqliteDb::relay`): the refs scheduled and the
    /// number of changes applied.
    async fn relay_timers(&self, _target: &dyn overdue::Store, _now: i64) -> overdue::Result<(Vec<TimerRef>, usize)> {
        Ok((Vec::new(), 0))
    }

    /// Inserts a product; [`crate::OrderError::AlreadyExists`] if its id is taken.
    async fn create_product(&self, p: NewProduct, clock: Arc<dyn Clock>) -> Result<Product>;
    /// Reserves stock, writes the order, its lines, its `created` event and its timers.
    async fn create_order(&self, o: NewOrder, plan: OrderPlan, clock: Arc<dyn Clock>) -> Result<(Order, Vec<TimerRef>)>;
    /// An API move: what it committed, or the refusal as an error (see
    /// [`crate::machine::refusal`]).
    async fn api_move(&self, id: String, mv: Move, delay_ms: i64, clock: Arc<dyn Clock>) -> Result<ApiMoved>;
    /// A timer-driven move; `Ok(false)` when the order was not in the move's start state.
    async fn timer_move(&self, id: String, mv: Move, source: String, clock: Arc<dyn Clock>) -> overdue::Result<bool>;
    /// The payment reminder: `reminded` event once, outbox row only when it was inserted.
    async fn remind(&self, id: String, source: String, clock: Arc<dyn Clock>) -> overdue::Result<bool>;
    async fn outbox_delivered(&self, ids: Vec<i64>, now: i64) -> Result<()>;
    /// `attempts += 1`; [`crate::OrderError::NotFound`] for an unknown id.
    async fn outbox_failed(&self, id: i64) -> Result<()>;

    async fn product(&self, id: String) -> Result<Product>;
    async fn products(&self, after: String, limit: u32) -> Result<Vec<Product>>;
    async fn order(&self, id: String) -> Result<Order>;
    async fn events(&self, id: String) -> Result<Vec<OrderEvent>>;
    async fn orders(&self, q: OrderQuery, limit: u32) -> Result<Vec<Order>>;
    async fn outbox_pending(&self, limit: u32) -> Result<Vec<OutboxMessage>>;
    /// `(kind, count)` of the events found (kinds absent from the table are absent here).
    async fn transition_counts(&self) -> Result<Vec<(String, u64)>>;
    /// `(status, count)` of the orders found.
    async fn status_counts(&self) -> Result<Vec<(String, u64)>>;
    /// The invariant check on one consistent snapshot.
    async fn invariants(&self, now: i64, bound_ms: i64) -> Result<InvariantReport>;
}
