//! The API's one error shape: `{"error":{"code":"…","message":"…"}}` (plus `"status"`, the
//! order's current status, on `illegal_transition` and `order_closed`).
//!
//! Every failure path of the router ends here: handler errors, extractor rejections (see
//! `extract`), the auth check, unknown routes and methods, and caught panics. The mapping from
//! code to HTTP status lives in one place, [`ApiErrorCode::status`], and `docs/api.md` and
//! `openapi.json` document the same table.

use axum::Json;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use overdue_orders::{OrderError, OrderStatus};
use serde::Serialize;

/// The machine-readable error codes of the API, each with one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ApiErrorCode {
    /// 400: malformed JSON, a wrong type, an unknown field, a value out of range.
    InvalidInput,
    /// 401: missing or wrong bearer token.
    Unauthorized,
    /// 404: no such product, order, timer, dead letter or route.
    NotFound,
    /// 405: the route exists but not with this method.
    MethodNotAllowed,
    /// 409: a product with this id already exists.
    AlreadyExists,
    /// 409: not enough stock; nothing was reserved.
    OutOfStock,
    /// 409: the order's current status does not allow the action.
    IllegalTransition,
    /// 409: a payment (or other action) arrived after the order was closed.
    OrderClosed,
    /// 413: the body exceeds the configured limit.
    PayloadTooLarge,
    /// 415: the body is not `application/json`.
    UnsupportedMediaType,
    /// 503 when transient (retry later), 500 otherwise.
    StoreError,
    /// 503: the server is shutting down.
    ShuttingDown,
    /// 500: a bug; the message says what.
    Internal,
}

impl ApiErrorCode {
    /// Every code, for documentation tests.
    pub const ALL: [ApiErrorCode; 13] = [
        ApiErrorCode::InvalidInput,
        ApiErrorCode::Unauthorized,
        ApiErrorCode::NotFound,
        ApiErrorCode::MethodNotAllowed,
        ApiErrorCode::AlreadyExists,
        ApiErrorCode::OutOfStock,
        ApiErrorCode::IllegalTransition,
        ApiErrorCode::OrderClosed,
        ApiErrorCode::PayloadTooLarge,
        ApiErrorCode::UnsupportedMediaType,
        ApiErrorCode::StoreError,
        ApiErrorCode::ShuttingDown,
        ApiErrorCode::Internal,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            ApiErrorCode::InvalidInput => "invalid_input",
            ApiErrorCode::Unauthorized => "unauthorized",
            ApiErrorCode::NotFound => "not_found",
            ApiErrorCode::MethodNotAllowed => "method_not_allowed",
            ApiErrorCode::AlreadyExists => "already_exists",
            ApiErrorCode::OutOfStock => "out_of_stock",
            ApiErrorCode::IllegalTransition => "illegal_transition",
            ApiErrorCode::OrderClosed => "order_closed",
            ApiErrorCode::PayloadTooLarge => "payload_too_large",
            ApiErrorCode::UnsupportedMediaType => "unsupported_media_type",
            ApiErrorCode::StoreError => "store_error",
            ApiErrorCode::ShuttingDown => "shutting_down",
            ApiErrorCode::Internal => "internal",
        }
    }

    /// The HTTP status (for `store_error`, the transient one; permanent store errors are 500).
    pub fn status(self) -> u16 {
        match self {
            ApiErrorCode::InvalidInput => 400,
            ApiErrorCode::Unauthorized => 401,
            ApiErrorCode::NotFound => 404,
            ApiErrorCode::MethodNotAllowed => 405,
            ApiErrorCode::AlreadyExists
            | ApiErrorCode::OutOfStock
            | ApiErrorCode::IllegalTransition
            | ApiErrorCode::OrderClosed => 409,
            ApiErrorCode::PayloadTooLarge => 413,
            ApiErrorCode::UnsupportedMediaType => 415,
            ApiErrorCode::StoreError | ApiErrorCode::ShuttingDown => 503,
            ApiErrorCode::Internal => 500,
        }
    }
}

/// An error answer.
#[derive(Debug)]
pub(crate) struct ApiError {
    code: ApiErrorCode,
    status: StatusCode,
    message: String,
    order_status: Option<OrderStatus>,
}

impl ApiError {
    pub(crate) fn new(code: ApiErrorCode, message: impl Into<String>) -> Self {
        let status = StatusCode::from_u16(code.status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        ApiError { code, status, message: message.into(), order_status: None }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        ApiError::new(ApiErrorCode::InvalidInput, message)
    }

    pub(crate) fn not_found(message: impl Into<String>) -> Self {
        ApiError::new(ApiErrorCode::NotFound, message)
    }

    fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }
}

impl From<overdue::Error> for ApiError {
    fn from(e: overdue::Error) -> Self {
        use overdue::Error as E;
        match &e {
            E::PayloadTooLarge { .. } => ApiError::new(ApiErrorCode::PayloadTooLarge, e.to_string()),
            _ if e.is_invalid_input() => ApiError::invalid(e.to_string()),
            _ if e.is_not_found() => ApiError::not_found(e.to_string()),
            E::ShuttingDown => ApiError::new(ApiErrorCode::ShuttingDown, e.to_string()),
            E::Store { transient: true, .. } => ApiError::new(ApiErrorCode::StoreError, e.to_string()),
            E::Store { .. } => {
                ApiError::new(ApiErrorCode::StoreError, e.to_string()).with_status(StatusCode::INTERNAL_SERVER_ERROR)
            }
            _ => ApiError::new(ApiErrorCode::Internal, e.to_string()),
        }
    }
}

impl From<OrderError> for ApiError {
    fn from(e: OrderError) -> Self {
        let e = match e {
            OrderError::Store(inner) => return ApiError::from(inner),
            e => e,
        };
        let code = match &e {
            OrderError::Invalid { .. } => ApiErrorCode::InvalidInput,
            OrderError::NotFound { .. } => ApiErrorCode::NotFound,
            OrderError::AlreadyExists { .. } => ApiErrorCode::AlreadyExists,
            OrderError::OutOfStock { .. } => ApiErrorCode::OutOfStock,
            OrderError::IllegalTransition { .. } => ApiErrorCode::IllegalTransition,
            OrderError::OrderClosed { .. } => ApiErrorCode::OrderClosed,
            _ => ApiErrorCode::Internal,
        };
        let order_status = e.current_status();
        ApiError { order_status, ..ApiError::new(code, e.to_string()) }
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'static str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<OrderStatus>,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(code = self.code.as_str(), message = %self.message, "request failed");
        }
        let body = Body { error: Inner { code: self.code.as_str(), message: &self.message, status: self.order_status } };
        let mut resp = (self.status, Json(body)).into_response();
        if self.code == ApiErrorCode::Unauthorized {
            resp.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_code_has_a_distinct_name_and_an_error_status() {
        let mut names = std::collections::HashSet::new();
        for c in ApiErrorCode::ALL {
            assert!(names.insert(c.as_str()), "duplicate code name {}", c.as_str());
            assert!((400..600).contains(&c.status()), "{c:?} -> {}", c.status());
        }
    }

    #[test]
    fn order_errors_keep_their_code_and_status() {
        let e = ApiError::from(OrderError::IllegalTransition { id: "o".into(), action: "ship", status: OrderStatus::Closed });
        assert_eq!((e.status, e.code, e.order_status), (StatusCode::CONFLICT, ApiErrorCode::IllegalTransition, Some(OrderStatus::Closed)));
        let e = ApiError::from(OrderError::Store(overdue::Error::ShuttingDown));
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        let e = ApiError::from(OrderError::Store(overdue::Error::Store {
            backend: "sqlite",
            message: "disk full".into(),
            transient: false,
            source: None,
        }));
        assert_eq!((e.status, e.code), (StatusCode::INTERNAL_SERVER_ERROR, ApiErrorCode::StoreError));
    }
}
