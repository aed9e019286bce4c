//! Errors of the order service, each with a stable machine-readable [`OrderError::code`].

use crate::model::OrderStatus;

/// `Result` with [`OrderError`].
pub type Result<T, E = OrderError> = std::result::Result<T, E>;

/// What can go wrong in the order service.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum OrderError {
    /// A field of the request is invalid; nothing was changed.
    #[error("invalid {field}: {message}")]
    Invalid { field: &'static str, message: String },
    /// No such product or order.
    #[error("no {what} with id {id:?}")]
    NotFound { what: &'static str, id: String },
    /// A product with this id already exists.
    #[error("a {what} with id {id:?} already exists")]
    AlreadyExists { what: &'static str, id: String },
    /// Not enough stock; nothing was reserved.
    #[error("product {product_id:?} has {available} in stock, {requested} requested")]
    OutOfStock { product_id: String, requested: i64, available: i64 },
    /// The order is not in a state that allows the action.
    #[error("cannot {action} order {id:?} in status {status}")]
    IllegalTransition { id: String, action: &'static str, status: OrderStatus },
    /// A payment arrived after the order was closed or its deadline passed.
    #[error("order {id:?} is closed: its payment deadline passed or it was cancelled")]
    OrderClosed { id: String },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] overdue::Error),
}

impl OrderError {
    /// Stable code for API clients: `invalid_input`, `not_found`, `already_exists`,
    /// `out_of_stock`, `illegal_transition`, `order_closed`, `store_error`.
    pub fn code(&self) -> &'static str {
        match self {
            OrderError::Invalid { .. } => "invalid_input",
            OrderError::NotFound { .. } => "not_found",
            OrderError::AlreadyExists { .. } => "already_exists",
            OrderError::OutOfStock { .. } => "out_of_stock",
            OrderError::IllegalTransition { .. } => "illegal_transition",
            OrderError::OrderClosed { .. } => "order_closed",
            OrderError::Store(e) if e.is_invalid_input() => "invalid_input",
            OrderError::Store(_) => "store_error",
        }
    }

    /// The current status, for `IllegalTransition` (the API returns it with the 409).
    pub fn current_status(&self) -> Option<OrderStatus> {
        match self {
            OrderError::IllegalTransition { status, .. } => Some(*status),
            OrderError::OrderClosed { .. } => Some(OrderStatus::Closed),
            _ => None,
        }
    }
}
