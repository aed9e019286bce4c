//! The error type of every overdue crate.
//!
//! Messages are lowercase and say what was wrong with which value; causes are kept as
//! `#[source]`. Input errors ([`Error::is_invalid_input`]) change nothing; transient store
//! errors ([`Error::is_transient`]) may succeed if retried.

use std::fmt;

/// `Result` with [`Error`] as the default error.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Boxed cause of a store error.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Everything that can go wrong in overdue.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// The queue name is empty, too long or has characters outside `[A-Za-z0-9._:-]`.
    #[error("invalid queue name {name:?}: {reason}")]
    InvalidQueue { name: String, reason: &'static str },
    /// The key is empty, too long or contains a control character.
    #[error("invalid key {key:?}: {reason}")]
    InvalidKey { key: String, reason: &'static str },
    /// The payload is larger than the configured limit.
    #[error("payload of {size} bytes exceeds the limit of {max} bytes")]
    PayloadTooLarge { size: usize, max: usize },
    /// The due time is before the Unix epoch or too far in the future.
    #[error("due time {due_at} ms is outside the supported range {min}..={max} ms since the unix epoch")]
    DueOutOfRange { due_at: i64, min: i64, max: i64 },
    /// A batch was larger than the store accepts in one call.
    #[error("batch of {size} timers exceeds the limit of {max}")]
    BatchTooLarge { size: usize, max: usize },
    /// The same `(queue, key)` appears twice in one batch.
    #[error("timer ({queue}, {key}) appears more than once in the batch")]
    DuplicateInBatch { queue: String, key: String },
    /// No pending timer has this identity.
    #[error("no timer ({queue}, {key})")]
    NotFound { queue: String, key: String },
    /// No dead letter has this id.
    #[error("no dead letter with id {0}")]
    DeadLetterNotFound(i64),
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The engine is shutting down and accepts no more work.
    #[error("the engine is shutting down")]
    ShuttingDown,
    /// The store failed.
    #[error("{backend} store error: {message}")]
    Store {
        backend: &'static str,
        message: String,
        transient: bool,
        #[source]
        source: Option<BoxError>,
    },
}

impl Error {
    /// A store error with a cause.
    pub fn store(
        backend: &'static str,
        message: impl fmt::Display,
        transient: bool,
        source: impl Into<BoxError>,
    ) -> Self {
        Error::Store { backend, message: message.to_string(), transient, source: Some(source.into()) }
    }

    /// True when the request itself was wrong: retrying it unchanged cannot succeed, and
    /// nothing was changed.
    pub fn is_invalid_input(&self) -> bool {
        matches!(
            self,
            Error::InvalidQueue { .. }
                | Error::InvalidKey { .. }
                | Error::PayloadTooLarge { .. }
                | Error::DueOutOfRange { .. }
                | Error::BatchTooLarge { .. }
                | Error::DuplicateInBatch { .. }
        )
    }

    /// True when the same call may succeed later (a lost connection, a busy database).
    pub fn is_transient(&self) -> bool {
        matches!(self, Error::Store { transient: true, .. })
    }

    /// True for the "no such timer / dead letter" errors.
    pub fn is_not_found(&self) -> bool {
        matches!(self, Error::NotFound { .. } | Error::DeadLetterNotFound(_))
    }
}
