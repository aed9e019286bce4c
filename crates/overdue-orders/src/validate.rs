//! Input checks. Every request is checked completely before anything is written, so an
//! [`OrderError::Invalid`] always means "nothing changed".

use std::collections::HashSet;
use std::time::Duration;

use crate::error::{OrderError, Result};
use crate::model::*;

/// Longest any configured delay may be: 10 years, far inside the engine's 120-year limit.
const MAX_CONFIG_DELAY: Duration = Duration::from_secs(10 * 366 * 86_400);

fn invalid(field: &'static str, message: impl Into<String>) -> OrderError {
    OrderError::Invalid { field, message: message.into() }
}

/// Shortens user input quoted in an error message.
fn quote(s: &str) -> String {
    const MAX: usize = 40;
    if s.len() <= MAX {
        format!("{s:?}")
    } else {
        let mut end = MAX;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{:?}…", &s[..end])
    }
}

/// A product or order id: 1..=[`MAX_ID_LEN`] bytes of `[A-Za-z0-9._-]`.
pub(crate) fn id(field: &'static str, s: &str) -> Result<()> {
    if s.is_empty() {
        return Err(invalid(field, "must not be empty"));
    }
    if s.len() > MAX_ID_LEN {
        return Err(invalid(field, format!("{} is {} bytes long; the limit is {MAX_ID_LEN}", quote(s), s.len())));
    }
    if !s.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-')) {
        return Err(invalid(field, format!("{} may only contain ASCII letters, digits and . _ -", quote(s))));
    }
    Ok(())
}

/// Free text: 1..=`max` bytes, not blank, no control characters.
fn text(field: &'static str, s: &str, max: usize) -> Result<()> {
    if s.trim().is_empty() {
        return Err(invalid(field, "must not be empty or blank"));
    }
    if s.len() > max {
        return Err(invalid(field, format!("is {} bytes long; the limit is {max}", s.len())));
    }
    if s.chars().any(char::is_control) {
        return Err(invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn range(field: &'static str, v: i64, min: i64, max: i64) -> Result<()> {
    if v < min || v > max {
        return Err(invalid(field, format!("{v} is outside {min}..={max}")));
    }
    Ok(())
}

/// Milliseconds of a duration, saturating.
pub(crate) fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

pub(crate) fn new_product(p: &NewProduct) -> Result<()> {
    if let Some(pid) = &p.id {
        id("id", pid)?;
    }
    text("name", &p.name, MAX_PRODUCT_NAME_LEN)?;
    range("price_cents", p.price_cents, 0, MAX_PRICE_CENTS)?;
    range("stock", p.stock, 0, MAX_STOCK)
}

/// Checks an order request; returns its payment timeout in milliseconds.
pub(crate) fn new_order(o: &NewOrder, cfg: &OrderConfig) -> Result<i64> {
    text("buyer", &o.buyer, MAX_BUYER_LEN)?;
    if o.items.is_empty() {
        return Err(invalid("items", "an order needs at least one line"));
    }
    if o.items.len() > MAX_LINES {
        return Err(invalid("items", format!("{} lines; the limit is {MAX_LINES}", o.items.len())));
    }
    let mut seen = HashSet::with_capacity(o.items.len());
    for (n, item) in o.items.iter().enumerate() {
        id("items.product_id", &item.product_id).map_err(|e| at_line(n, e))?;
        range("items.quantity", item.quantity, 1, MAX_QUANTITY).map_err(|e| at_line(n, e))?;
        if !seen.insert(item.product_id.as_str()) {
            return Err(invalid(
                "items.product_id",
                format!("line {n}: product {:?} appears more than once; order it once with the total quantity", item.product_id),
            ));
        }
    }
    match o.pay_timeout_ms {
        None => Ok(ms(cfg.pay_timeout)),
        Some(t) => {
            range("pay_timeout_ms", t, ms(cfg.min_pay_timeout), ms(cfg.max_pay_timeout))?;
            Ok(t)
        }
    }
}

fn at_line(n: usize, e: OrderError) -> OrderError {
    match e {
        OrderError::Invalid { field, message } => OrderError::Invalid { field, message: format!("line {n}: {message}") },
        other => other,
    }
}

/// A page size: 0 means [`DEFAULT_PAGE`], more than [`MAX_PAGE`] is refused.
pub(crate) fn page(limit: u32) -> Result<u32> {
    match limit {
        0 => Ok(DEFAULT_PAGE),
        n if n <= MAX_PAGE => Ok(n),
        n => Err(invalid("limit", format!("{n} is above the maximum page size of {MAX_PAGE}"))),
    }
}

pub(crate) fn query(q: &OrderQuery) -> Result<u32> {
    if let Some(b) = &q.buyer {
        text("buyer", b, MAX_BUYER_LEN)?;
    }
    if let Some(b) = &q.before {
        id("before", b)?;
    }
    page(q.limit)
}

/// The configuration makes sense: every delay positive and at most ten years, and the default
/// payment timeout within the per-order bounds.
pub(crate) fn config(cfg: &OrderConfig) -> Result<()> {
    let bad = |m: String| Err(invalid("config", m));
    for (name, d) in [
        ("pay_timeout", cfg.pay_timeout),
        ("auto_confirm_after", cfg.auto_confirm_after),
        ("refund_auto_approve_after", cfg.refund_auto_approve_after),
        ("min_pay_timeout", cfg.min_pay_timeout),
        ("max_pay_timeout", cfg.max_pay_timeout),
    ] {
        if d < Duration::from_millis(1) || d > MAX_CONFIG_DELAY {
            return bad(format!("{name} {d:?} must be between 1 ms and {MAX_CONFIG_DELAY:?}"));
        }
    }
    if cfg.remind_before > MAX_CONFIG_DELAY {
        return bad(format!("remind_before {:?} is above {MAX_CONFIG_DELAY:?}", cfg.remind_before));
    }
    if cfg.min_pay_timeout > cfg.max_pay_timeout {
        return bad(format!("min_pay_timeout {:?} exceeds max_pay_timeout {:?}", cfg.min_pay_timeout, cfg.max_pay_timeout));
    }
    if cfg.pay_timeout < cfg.min_pay_timeout || cfg.pay_timeout > cfg.max_pay_timeout {
        return bad(format!(
            "pay_timeout {:?} is outside min_pay_timeout..=max_pay_timeout ({:?}..={:?})",
            cfg.pay_timeout, cfg.min_pay_timeout, cfg.max_pay_timeout
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<impl std::fmt::Debug>) -> &'static str {
        match r {
            Err(OrderError::Invalid { field, .. }) => field,
            other => panic!("expected Invalid, got {other:?}"),
        }
    }

    #[test]
    fn ids_are_short_and_plain() {
        assert!(id("id", "p-1.A_b").is_ok());
        assert_eq!(field(id("id", "")), "id");
        assert_eq!(field(id("id", "a b")), "id");
        assert_eq!(field(id("id", "é")), "id");
        assert_eq!(field(id("id", &"x".repeat(65))), "id");
        assert!(id("id", &"x".repeat(64)).is_ok());
    }

    #[test]
    fn long_input_is_quoted_short() {
        let q = quote(&"é".repeat(100));
        assert!(q.len() < 60, "{q}");
    }

    #[test]
    fn default_config_is_valid_and_nonsense_is_not() {
        assert!(config(&OrderConfig::default()).is_ok());
        let c = OrderConfig { min_pay_timeout: Duration::from_secs(10), max_pay_timeout: Duration::from_secs(5), ..OrderConfig::default() };
        assert_eq!(field(config(&c)), "config");
        let c = OrderConfig { auto_confirm_after: Duration::ZERO, ..OrderConfig::default() };
        assert_eq!(field(config(&c)), "config");
    }

    #[test]
    fn pages_default_and_cap() {
        assert_eq!(page(0).expect("0"), DEFAULT_PAGE);
        assert_eq!(page(MAX_PAGE).expect("max"), MAX_PAGE);
        assert_eq!(field(page(MAX_PAGE + 1)), "limit");
    }
}
