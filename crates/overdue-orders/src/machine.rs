//! The state machine every backend shares: the moves (which statuses an edge starts from, what
//! it writes, which timers it cancels and schedules), how a refusal is explained, ids, and the
//! envelope that carries a domain error through a store error. The statements that apply a move
//! live with each backend (`sqlite`, `sqlx_db`); what a move *means* lives only here.

use std::time::Duration;

use overdue::TimerRef;

use crate::error::OrderError;
use crate::model::*;

/// `backend` of the store error that carries a domain error out of a write closure.
const ABORT_BACKEND: &str = "orders";
/// Pause before the engine retries a firing that arrived while the service was being dropped.
pub(crate) const GONE_RETRY: Duration = Duration::from_secs(1);

/// Wraps a domain error so a write closure can return `Err` (rolling back its savepoint) and
/// the caller still gets the [`OrderError`] back from [`recover`].
pub(crate) fn abort(e: OrderError) -> overdue::Error {
    overdue::Error::Store { backend: ABORT_BACKEND, message: e.to_string(), transient: false, source: Some(Box::new(e)) }
}

/// Undoes [`abort`]; any other store error becomes [`OrderError::Store`].
pub(crate) fn recover(e: overdue::Error) -> OrderError {
    match e {
        overdue::Error::Store { backend, message, transient, source: Some(source) } if backend == ABORT_BACKEND => {
            match source.downcast::<OrderError>() {
                Ok(domain) => *domain,
                Err(source) => OrderError::Store(overdue::Error::Store { backend, message, transient, source: Some(source) }),
            }
        }
        other => OrderError::Store(other),
    }
}


/// One edge (or set of edges) of the state machine and what comes with it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Move {
    /// Verb for [`OrderError::IllegalTransition`].
    pub(crate) action: &'static str,
    /// Statuses the order may be in (the second repeats the first when there is one).
    pub(crate) from: [OrderStatus; 2],
    pub(crate) to: OrderStatus,
    /// `order_events.kind` written.
    pub(crate) event: &'static str,
    pub(crate) close_reason: Option<&'static str>,
    /// Give the order's stock back (closing).
    pub(crate) release_stock: bool,
    /// Timers of this order removed in the same write.
    pub(crate) cancel: &'static [&'static str],
    /// Timer scheduled in the same write, if any (its delay comes from the config).
    pub(crate) schedule: Option<&'static str>,
    /// Only while `pay_deadline > now` (payment).
    pub(crate) before_deadline: bool,
}

use OrderStatus::*;

pub(crate) const PAY: Move = Move {
    action: "pay",
    from: [PendingPayment, PendingPayment],
    to: Paid,
    event: "paid",
    close_reason: None,
    release_stock: false,
    cancel: &[Q_CLOSE, Q_REMIND],
    schedule: None,
    before_deadline: true,
};
pub(crate) const CLOSE: Move = Move {
    action: "close",
    from: [PendingPayment, PendingPayment],
    to: Closed,
    event: "closed",
    close_reason: Some(CLOSE_TIMEOUT),
    release_stock: true,
    cancel: &[Q_CLOSE, Q_REMIND],
    schedule: None,
    before_deadline: false,
};
pub(crate) const CANCEL: Move = Move { action: "cancel", close_reason: Some(CLOSE_BUYER_CANCEL), ..CLOSE };
pub(crate) const SHIP: Move = Move {
    action: "ship",
    from: [Paid, Paid],
    to: Shipped,
    event: "shipped",
    close_reason: None,
    release_stock: false,
    cancel: &[],
    schedule: Some(Q_AUTO_CONFIRM),
    before_deadline: false,
};
pub(crate) const CONFIRM: Move = Move {
    action: "confirm",
    from: [Shipped, Shipped],
    to: Completed,
    event: "completed",
    cancel: &[Q_AUTO_CONFIRM],
    schedule: None,
    ..SHIP
};
pub(crate) const REQUEST_REFUND: Move = Move {
    action: "request a refund for",
    from: [Paid, Shipped],
    to: RefundRequested,
    event: "refund_requested",
    cancel: &[Q_AUTO_CONFIRM],
    schedule: Some(Q_REFUND_AUTO_APPROVE),
    ..SHIP
};
pub(crate) const APPROVE_REFUND: Move = Move {
    action: "approve the refund of",
    from: [RefundRequested, RefundRequested],
    to: Refunded,
    event: "refunded",
    cancel: &[Q_REFUND_AUTO_APPROVE],
    schedule: None,
    ..SHIP
};
pub(crate) const REJECT_REFUND: Move =
    Move { action: "reject the refund of", to: RefundRejected, event: "refund_rejected", ..APPROVE_REFUND };

/// What a transition write did. `O` is what a move hands back: the order (items loaded if
/// asked), or nothing where the caller does not need it (the SQLite store's timer handlers skip
/// the read of the moved row).
pub(crate) enum Applied<O = Order> {
    /// The order moved; here is `O` with the timers scheduled.
    Moved(O, Vec<TimerRef>),
    /// The order is not in a state the move starts from.
    Refused { status: OrderStatus, pay_deadline: i64 },
    /// No such order.
    Missing,
}

/// Who caused a transition: `order_events.source` and `.detail`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Cause<'a> {
    pub(crate) source: &'a str,
    pub(crate) detail: Option<&'a str>,
}

pub(crate) const BY_API: Cause<'static> = Cause { source: SOURCE_API, detail: None };

/// A fresh id: `<prefix>-<13-digit ms>-<16 hex>`; sorts by creation time to the millisecond.
pub(crate) fn new_id(prefix: &str, now: i64) -> String {
    format!("{prefix}-{:013}-{:016x}", now.max(0), rand::random::<u64>())
}

/// Why an API move did not apply, and what the caller is told.
pub(crate) enum Refusal {
    /// A payment lost the race against the clock: close the order now, in the same write, and
    /// answer `order_closed` (every later read agrees; the close timer then finds nothing to do).
    CloseLate,
    /// Answer with this error; nothing is written.
    Error(OrderError),
}

/// The cause recorded when a late payment closes the order ([`Refusal::CloseLate`]).
pub(crate) const LATE_PAYMENT: Cause<'static> =
    Cause { source: SOURCE_API, detail: Some("payment arrived after the deadline") };

/// What an API move that matched no row means, given the order's current state.
pub(crate) fn refusal(id: &str, mv: &Move, status: OrderStatus, pay_deadline: i64, now: i64) -> Refusal {
    match status {
        OrderStatus::PendingPayment if mv.before_deadline && pay_deadline <= now => Refusal::CloseLate,
        OrderStatus::Closed if mv.before_deadline => Refusal::Error(OrderError::OrderClosed { id: id.to_owned() }),
        status => Refusal::Error(OrderError::IllegalTransition { id: id.to_owned(), action: mv.action, status }),
    }
}

/// The timer a move schedules, if any, and its delay from `config`.
pub(crate) fn schedule_delay(mv: &Move, config: &OrderConfig) -> i64 {
    match mv.schedule {
        Some(Q_AUTO_CONFIRM) => crate::validate::ms(config.auto_confirm_after),
        Some(Q_REFUND_AUTO_APPROVE) => crate::validate::ms(config.refund_auto_approve_after),
        _ => 0,
    }
}

/// The ref of a timer a move scheduled.
pub(crate) fn timer_ref(queue: &str, key: &str, generation: u64, due_at: i64) -> TimerRef {
    TimerRef { queue: queue.to_owned(), key: key.to_owned(), generation, due_at }
}

/// The timers [`crate::OrderService::create_order`] schedules for a new order: the reminder
/// (when its time is still ahead) and the close at the deadline.
pub(crate) fn order_timers(id: &str, now: i64, deadline: i64, remind_before: i64) -> Vec<overdue::TimerSpec> {
    let mut specs = Vec::with_capacity(2);
    let remind_at = deadline.saturating_sub(remind_before);
    if remind_before > 0 && remind_at > now {
        specs.push(overdue::TimerSpec::new(Q_REMIND, id.to_owned(), remind_at));
    }
    specs.push(overdue::TimerSpec::new(Q_CLOSE, id.to_owned(), deadline));
    specs
}

/// The reminder's outbox payload.
pub(crate) fn reminder_payload(id: &str, buyer: &str, pay_deadline: i64, total_cents: i64) -> String {
    serde_json::json!({ "order_id": id, "buyer": buyer, "pay_deadline": pay_deadline, "total_cents": total_cents })
        .to_string()
}

/// A new order as `create_order` writes it: pending payment, version 1.
pub(crate) fn pending_order(id: String, buyer: String, total_cents: i64, pay_deadline: i64, now: i64, items: Vec<OrderItem>) -> Order {
    Order {
        id,
        buyer,
        status: OrderStatus::PendingPayment,
        total_cents,
        pay_deadline,
        created_at: now,
        updated_at: now,
        version: 1,
        close_reason: None,
        items,
    }
}
