//! Documented bounds on every field that comes from outside, and [`Limits::check`].
//!
//! | field | rule |
//! |---|---|
//! | queue | 1..=[`MAX_QUEUE_LEN`] bytes of `[A-Za-z0-9._:-]` |
//! | key | 1..=[`MAX_KEY_LEN`] bytes of UTF-8, no control characters |
//! | payload | 0..=`max_payload` bytes (default [`DEFAULT_MAX_PAYLOAD`], 64 KiB) |
//! | due_at | `0..=now + `[`MAX_DELAY_MS`] ms since the Unix epoch; a past due time fires at once |
//!
//! The queue alphabet is narrow on purpose: queue names become metric labels, SQL values,
//! Redis hash tags and broker topic names, and every one of those must accept them unescaped.

use crate::error::{Error, Result};
use crate::model::TimerSpec;

/// Longest queue name, in bytes.
pub const MAX_QUEUE_LEN: usize = 64;
/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 256;
/// Default payload limit: 64 KiB.
pub const DEFAULT_MAX_PAYLOAD: usize = 64 * 1024;
/// Hard upper bound on any configured payload limit: 16 MiB.
pub const MAX_PAYLOAD_LIMIT: usize = 16 * 1024 * 1024;
/// One (Julian) year in milliseconds.
pub const YEAR_MS: i64 = 365 * 24 * 3_600_000 + 6 * 3_600_000;
/// Furthest a timer may be scheduled ahead of now: 120 years (the contract promises 100).
pub const MAX_DELAY_MS: i64 = 120 * YEAR_MS;
/// Most timers accepted in one batch call.
pub const MAX_BATCH: usize = 10_000;

/// Configurable limits. Only the payload limit is configurable; the rest are constants so that
/// every backend can rely on them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload accepted, in bytes.
    pub max_payload: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_payload: DEFAULT_MAX_PAYLOAD }
    }
}

impl Limits {
    /// Limits with a custom payload bound; errors if it exceeds [`MAX_PAYLOAD_LIMIT`].
    pub fn with_max_payload(max_payload: usize) -> Result<Self> {
        if max_payload > MAX_PAYLOAD_LIMIT {
            return Err(Error::Config(format!(
                "max payload {max_payload} bytes exceeds the hard limit of {MAX_PAYLOAD_LIMIT} bytes"
            )));
        }
        Ok(Limits { max_payload })
    }

    /// Checks a whole timer against the limits, given the current time.
    pub fn check(&self, spec: &TimerSpec, now_ms: i64) -> Result<()> {
        check_queue(&spec.queue)?;
        check_key(&spec.key)?;
        if spec.payload.len() > self.max_payload {
            return Err(Error::PayloadTooLarge { size: spec.payload.len(), max: self.max_payload });
        }
        check_due(spec.due_at, now_ms)
    }
}

/// Checks a queue name.
pub fn check_queue(queue: &str) -> Result<()> {
    let reason = if queue.is_empty() {
        "must not be empty"
    } else if queue.len() > MAX_QUEUE_LEN {
        "longer than 64 bytes"
    } else if !queue.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-')) {
        "only ASCII letters, digits and . _ : - are allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidQueue { name: truncate(queue), reason })
}

/// Checks a key.
pub fn check_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        "must not be empty"
    } else if key.len() > MAX_KEY_LEN {
        "longer than 256 bytes"
    } else if key.chars().any(char::is_control) {
        "control characters are not allowed"
    } else {
        return Ok(());
    };
    Err(Error::InvalidKey { key: truncate(key), reason })
}

/// Checks a due time against now.
pub fn check_due(due_at: i64, now_ms: i64) -> Result<()> {
    let max = now_ms.saturating_add(MAX_DELAY_MS);
    if due_at < 0 || due_at > max {
        return Err(Error::DueOutOfRange { due_at, min: 0, max });
    }
    Ok(())
}

/// Keeps error messages short when the offending value is huge.
fn truncate(s: &str) -> String {
    const SHOWN: usize = 80;
    if s.len() <= SHOWN {
        return s.to_owned();
    }
    let mut end = SHOWN;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(queue: &str, key: &str, due_at: i64, payload: usize) -> TimerSpec {
        TimerSpec::new(queue, key, due_at).with_payload(vec![0; payload])
    }

    #[test]
    fn accepts_the_documented_extremes() {
        let l = Limits::default();
        let now = 1_700_000_000_000;
        assert!(l.check(&spec("q", "k", now + 1, 0), now).is_ok());
        assert!(l.check(&spec(&"q".repeat(64), &"k".repeat(256), now + 100 * YEAR_MS, 65536), now).is_ok());
        assert!(l.check(&spec("order.close:v1_x-y", "ключ/🙂", 0, 0), now).is_ok(), "past due is fine");
    }

    #[test]
    fn rejects_each_bad_field_with_its_own_error() {
        let l = Limits::default();
        let now = 1_700_000_000_000;
        type IsExpected = fn(&Error) -> bool;
        let cases: Vec<(TimerSpec, IsExpected)> = vec![
            (spec("", "k", now, 0), |e| matches!(e, Error::InvalidQueue { .. })),
            (spec(&"q".repeat(65), "k", now, 0), |e| matches!(e, Error::InvalidQueue { .. })),
            (spec("a b", "k", now, 0), |e| matches!(e, Error::InvalidQueue { .. })),
            (spec("q", "", now, 0), |e| matches!(e, Error::InvalidKey { .. })),
            (spec("q", &"k".repeat(257), now, 0), |e| matches!(e, Error::InvalidKey { .. })),
            (spec("q", "a\nb", now, 0), |e| matches!(e, Error::InvalidKey { .. })),
            (spec("q", "k", now, 65537), |e| matches!(e, Error::PayloadTooLarge { size: 65537, max: 65536 })),
            (spec("q", "k", -1, 0), |e| matches!(e, Error::DueOutOfRange { .. })),
            (spec("q", "k", now + MAX_DELAY_MS + 1, 0), |e| matches!(e, Error::DueOutOfRange { .. })),
            (spec("q", "k", i64::MAX, 0), |e| matches!(e, Error::DueOutOfRange { .. })),
        ];
        for (s, is_expected) in cases {
            let err = l.check(&s, now).expect_err("must be rejected");
            assert!(is_expected(&err), "unexpected error {err:?} for {:?}/{:?}", s.queue, s.key);
            assert!(err.is_invalid_input(), "{err} must count as invalid input");
        }
    }

    #[test]
    fn error_messages_stay_short_for_huge_values() {
        let err = check_key(&"x".repeat(10_000)).expect_err("too long");
        assert!(err.to_string().len() < 200, "{err}");
    }

    #[test]
    fn payload_limit_is_configurable_within_bounds() {
        assert!(Limits::with_max_payload(1024).is_ok());
        assert!(Limits::with_max_payload(MAX_PAYLOAD_LIMIT + 1).is_err());
        let l = Limits::with_max_payload(4).expect("ok");
        assert!(matches!(l.check(&spec("q", "k", 0, 5), 0), Err(Error::PayloadTooLarge { size: 5, max: 4 })));
    }
}
