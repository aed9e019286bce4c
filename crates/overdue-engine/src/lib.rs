//! # overdue-engine
//!
//! Runs handlers when timers come due, over any [`overdue_core::Store`], woken by one of three
//! triggers ([`TriggerKind`]): the hierarchical timing wheel (default), a binary heap, or a
//! periodic scan. See [`engine`] for how a timer fires and why nothing is lost or fired twice
//! in effect.
//!
//! ```no_run
//! # async fn demo(store: std::sync::Arc<dyn overdue_core::Store>) -> overdue_core::Result<()> {
//! use overdue_engine::{Engine, QueueConfig};
//! use overdue_core::{Outcome, TimerSpec};
//! let engine = Engine::builder(store)
//!     .handler("order.close", QueueConfig::default(), |f: overdue_core::Firing| async move {
//!         println!("closing order {}", f.key);
//!         Outcome::Done
//!     })
//!     .start()
//!     .await?;
//! engine.schedule(TimerSpec::new("order.close", "o-1", 1_700_000_000_000)).await?;
//! # Ok(()) }
//! ```

pub mod config;
pub mod engine;
mod external;
pub mod handler;
mod index;
pub mod stats;

pub use config::{EngineConfig, QueueConfig, TriggerKind};
pub use engine::{Engine, EngineBuilder, ShutdownReport};
pub use handler::Handler;
pub use stats::{EngineStats, LatenessSummary, MAX_QUEUE_LABELS, OTHER_QUEUES, RECENT_WINDOW, queue_label};
