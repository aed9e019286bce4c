//! # overdue-core
//!
//! The vocabulary every other overdue crate speaks, and nothing else:
//!
//! - [`model`]: what a timer is — identity `(queue, key)`, `due_at` in milliseconds since the
//!   Unix epoch (UTC), an opaque payload and a *generation* that grows on every upsert;
//! - [`limits`]: the documented bounds on queue names, keys, payloads and due times, and the
//!   one function that checks a timer against them;
//! - [`clock`]: time is injected. [`SystemClock`] is the only code that reads the wall clock;
//!   [`ManualClock`] is advanced by tests so that engine tests run in virtual time;
//! - [`store`]: the [`Store`] trait a backend implements, with its claim/lease contract;
//! - [`error`]: one `#[non_exhaustive]` error type;
//! - [`shared`]: what the stores several nodes share have in common (partition hash, node URL
//!   parameters), without a driver.
//!
//! This crate imports no database, broker or network driver. Backends live in their own crates
//! and depend on this one; the engine depends on this one and on no backend.

pub mod clock;
pub mod error;
pub mod limits;
pub mod model;
pub mod shared;
pub mod store;
pub mod trigger;

pub use clock::{Clock, ManualClock, SystemClock};
pub use error::{Error, Result};
pub use limits::Limits;
pub use model::{
    Claimed, DeadLetter, DeadLetterQuery, DueBuckets, DueHistogram, NodeLease, Firing, ListQuery, Outcome, QueueCount, Settlement,
    Timer, TimerRef, TimerSpec, TimerState,
};
pub use store::{Capabilities, Store};
pub use trigger::{
    Delivery, DueSink, ExternalTrigger, MessageOutcome, NOTICES_PER_MESSAGE, decode_notices, encode_notices, pack_by,
    reconnect_pause,
};
