//! The order model as the API sees it. Money is integer cents; times are ms since the epoch.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Timer queue: remind the buyer before the payment deadline.
pub const Q_REMIND: &str = "order.remind";
/// Timer queue: close the unpaid order at its deadline.
pub const Q_CLOSE: &str = "order.close";
/// Timer queue: confirm receipt N days after shipping.
pub const Q_AUTO_CONFIRM: &str = "order.auto_confirm";
/// Timer queue: approve a refund the merchant ignored.
pub const Q_REFUND_AUTO_APPROVE: &str = "refund.auto_approve";
/// Every queue the order service handles.
pub const ORDER_QUEUES: [&str; 4] = [Q_REMIND, Q_CLOSE, Q_AUTO_CONFIRM, Q_REFUND_AUTO_APPROVE];

/// Longest product or order id, in bytes. Ids are made of `[A-Za-z0-9._-]`.
pub const MAX_ID_LEN: usize = 64;
/// Longest product name, in bytes.
pub const MAX_PRODUCT_NAME_LEN: usize = 200;
/// Longest buyer id, in bytes.
pub const MAX_BUYER_LEN: usize = 128;
/// Highest unit price: 10^12 cents (ten billion in the currency's main unit).
pub const MAX_PRICE_CENTS: i64 = 1_000_000_000_000;
/// Most stock a product may be created with.
pub const MAX_STOCK: i64 = 1_000_000_000;
/// Most lines in one order.
pub const MAX_LINES: usize = 100;
/// Most units of one product in one order.
pub const MAX_QUANTITY: i64 = 10_000;
/// Page size used when a listing asks for 0.
pub const DEFAULT_PAGE: u32 = 50;
/// Largest page a listing returns; asking for more is [`crate::OrderError::Invalid`].
pub const MAX_PAGE: u32 = 500;
/// Most outbox ids acknowledged in one [`crate::OrderService::outbox_delivered`] call.
pub const MAX_OUTBOX_ACK: usize = 1_000;
/// Topic of the outbox message written when the payment reminder fires.
pub const TOPIC_REMINDER: &str = "order.reminder";

/// `order_events.kind` values, in lifecycle order. `reminded` is the only one that is not a
/// status change (it does not bump [`Order::version`]).
pub const EVENT_KINDS: [&str; 9] = [
    "created",
    "reminded",
    "paid",
    "closed",
    "shipped",
    "completed",
    "refund_requested",
    "refunded",
    "refund_rejected",
];
/// `order_events.source` of a transition made through the API (timers use their queue name).
pub const SOURCE_API: &str = "api";
/// `close_reason` of an order closed because its payment deadline passed.
pub const CLOSE_TIMEOUT: &str = "timeout";
/// `close_reason` of an order the buyer cancelled.
pub const CLOSE_BUYER_CANCEL: &str = "buyer_cancel";

/// Where an order is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OrderStatus {
    PendingPayment,
    Paid,
    Shipped,
    Completed,
    Closed,
    RefundRequested,
    Refunded,
    RefundRejected,
}

impl OrderStatus {
    /// Every status, in lifecycle order.
    pub const ALL: [OrderStatus; 8] = [
        OrderStatus::PendingPayment,
        OrderStatus::Paid,
        OrderStatus::Shipped,
        OrderStatus::Completed,
        OrderStatus::Closed,
        OrderStatus::RefundRequested,
        OrderStatus::Refunded,
        OrderStatus::RefundRejected,
    ];

    /// The stored / wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            OrderStatus::PendingPayment => "pending_payment",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Completed => "completed",
            OrderStatus::Closed => "closed",
            OrderStatus::RefundRequested => "refund_requested",
            OrderStatus::Refunded => "refunded",
            OrderStatus::RefundRejected => "refund_rejected",
        }
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for OrderStatus {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        OrderStatus::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| format!("unknown status {s:?}; expected one of {}", OrderStatus::ALL.map(|s| s.as_str()).join(", ")))
    }
}

/// A product and its stock. `stock` is what can still be reserved; `stock_total` changes only
/// when stock is added, so `stock_total = stock + quantity held by orders that are not closed`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Product {
    pub id: String,
    pub name: String,
    pub price_cents: i64,
    pub stock: i64,
    pub stock_total: i64,
    pub created_at: i64,
}

/// A product to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewProduct {
    /// 1–64 bytes of `[A-Za-z0-9._-]`; generated (`p-<13-digit ms>-<16 hex>`) when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// 1–200 bytes, not blank, no control characters.
    pub name: String,
    /// 0 ..= 10^12.
    pub price_cents: i64,
    /// 0 ..= 10^9.
    pub stock: i64,
}

/// One line of an order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub product_id: String,
    pub quantity: i64,
    /// Unit price when the order was created.
    pub price_cents: i64,
}

/// A line to order.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewItem {
    /// An existing product's id.
    pub product_id: String,
    /// 1 ..= 10,000.
    pub quantity: i64,
}

/// An order to create.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NewOrder {
    /// Buyer id, 1–128 bytes, not blank, no control characters.
    pub buyer: String,
    /// 1–100 lines, each product at most once.
    pub items: Vec<NewItem>,
    /// Overrides the payment timeout, within [`OrderConfig::min_pay_timeout`] ..=
    /// [`OrderConfig::max_pay_timeout`].
    #[serde(default)]
    pub pay_timeout_ms: Option<i64>,
}

/// An order with its lines. Ids are `o-<13-digit creation ms>-<16 hex>`, so they sort by
/// creation time (to the millisecond) and [`OrderQuery::before`] pages newest first.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub id: String,
    pub buyer: String,
    pub status: OrderStatus,
    pub total_cents: i64,
    pub pay_deadline: i64,
    pub created_at: i64,
    pub updated_at: i64,
    /// Incremented by every transition.
    pub version: i64,
    /// `timeout` or `buyer_cancel` once closed.
    pub close_reason: Option<String>,
    pub items: Vec<OrderItem>,
}

/// One transition of an order (`order_events`; one row per order and kind).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderEvent {
    /// `created`, `reminded`, `paid`, `closed`, `shipped`, `completed`, `refund_requested`,
    /// `refunded`, `refund_rejected`.
    pub kind: String,
    pub at: i64,
    /// What caused it: `api`, or the timer queue that fired it (e.g. `order.close`).
    pub source: String,
    pub detail: Option<String>,
}

/// Filter and page for listing orders, newest first by id cursor.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct OrderQuery {
    pub status: Option<OrderStatus>,
    pub buyer: Option<String>,
    /// Orders with an id strictly less than this (ids sort by creation time).
    pub before: Option<String>,
    /// 1..=500; 0 means 50.
    pub limit: u32,
}

/// A notification waiting in the outbox.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutboxMessage {
    pub id: i64,
    /// e.g. `order.reminder`.
    pub topic: String,
    /// JSON text.
    pub payload: String,
    pub created_at: i64,
    pub attempts: u32,
}

/// Timeouts of the order service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OrderConfig {
    /// Payment deadline after creation. Default 30 min.
    pub pay_timeout: Duration,
    /// Reminder this long before the deadline (skipped if the timeout is shorter). Default 5 min.
    pub remind_before: Duration,
    /// Receipt is confirmed this long after shipping. Default 7 days.
    pub auto_confirm_after: Duration,
    /// An unanswered refund request is approved after this. Default 3 days.
    pub refund_auto_approve_after: Duration,
    /// Shortest per-order payment timeout. Default 1 s.
    pub min_pay_timeout: Duration,
    /// Longest per-order payment timeout. Default 7 days.
    pub max_pay_timeout: Duration,
}

impl Default for OrderConfig {
    fn default() -> Self {
        OrderConfig {
            pay_timeout: Duration::from_secs(30 * 60),
            remind_before: Duration::from_secs(5 * 60),
            auto_confirm_after: Duration::from_secs(7 * 86_400),
            refund_auto_approve_after: Duration::from_secs(3 * 86_400),
            min_pay_timeout: Duration::from_secs(1),
            max_pay_timeout: Duration::from_secs(7 * 86_400),
        }
    }
}

/// What [`crate::OrderService::check_invariants`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InvariantReport {
    pub orders: u64,
    /// Products whose `stock_total` differs from `stock` + quantity held by open orders.
    pub stock_mismatches: Vec<String>,
    /// Orders that are paid (or later) and also have a `closed` event.
    pub paid_and_closed: Vec<String>,
    /// Unpaid orders whose deadline passed more than `bound_ms` ago.
    pub overdue_unpaid: Vec<String>,
    /// Orders whose status disagrees with their events.
    pub inconsistent: Vec<String>,
}

impl InvariantReport {
    /// True when nothing is wrong.
    pub fn ok(&self) -> bool {
        self.stock_mismatches.is_empty() && self.paid_and_closed.is_empty() && self.overdue_unpaid.is_empty() && self.inconsistent.is_empty()
    }
}
