//! # overdue-orders
//!
//! The order service a shop runs, built on the overdue engine. See `../shared/DESIGN.md`
//! (Orders) and `docs/orders.md`. The orders live in the database of the timer store: the
//! embedded SQLite store, or PostgreSQL / MySQL with the features `postgres` / `mysql`
//! ([`OrderBackend`]).
//!
//! - tables `products`, `orders`, `order_items`, `order_events` (`UNIQUE(order_id, kind)`: a
//!   transition happens once), `outbox`;
//! - states `pending_payment → paid → shipped → completed`, `pending_payment → closed`,
//!   `paid | shipped → refund_requested → refunded | refund_rejected`;
//! - timers `order.remind`, `order.close`, `order.auto_confirm`, `refund.auto_approve`, written in
//!   the same transaction as the order change that implies them;
//! - every transition a conditional update, every timer handler idempotent.
//!
//! ## Wiring
//!
//! ```no_run
//! # async fn wire() -> Result<(), Box<dyn std::error::Error>> {
//! use std::sync::Arc;
//! use overdue::{Clock, Engine, SystemClock};
//! use overdue_orders::{NewItem, NewOrder, OrderConfig, OrderService};
//! use overdue_sql::{SqliteOptions, SqliteStore};
//!
//! let store = SqliteStore::open("overdue-data/overdue.db", SqliteOptions::default()).await?;
//! let clock: Arc<dyn Clock> = Arc::new(SystemClock);
//! // Runs the order migrations; the engine and the service must share the clock.
//! let svc = OrderService::open(store.clone(), clock.clone(), OrderConfig::default()).await?;
//! let builder = Engine::builder(Arc::new(store)).clock(clock);
//! let engine = Arc::new(svc.register_handlers(builder).start().await?);
//! svc.attach(engine.clone());
//!
//! let order = svc
//!     .create_order(NewOrder {
//!         buyer: "alice".into(),
//!         items: vec![NewItem { product_id: "tea".into(), quantity: 2 }],
//!         pay_timeout_ms: None,
//!     })
//!     .await?;
//! svc.pay(&order.id).await?;
//! # Ok(()) }
//! ```

mod db;
pub mod error;
mod machine;
pub mod model;
mod read;
pub mod schema;
pub mod service;
mod sql;
mod sqlite;
#[cfg(any(feature = "postgres", feature = "mysql"))]
mod sqlx_db;
mod validate;

pub use error::{OrderError, Result};
pub use model::*;
pub use service::{OrderBackend, OrderService};
