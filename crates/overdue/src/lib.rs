//! # overdue
//!
//! The crate applications depend on. It re-exports the timer model ([`TimerSpec`], [`Firing`],
//! [`Outcome`]…), the [`Engine`], the timing [`wheel`], and each store behind its cargo feature,
//! and picks a store by URL with [`open`].
//!
//! | URL | store | feature |
//! |---|---|---|
//! | `sqlite:PATH` / `sqlite://PATH` | embedded SQLite ([`sqlite::SqliteStore`]) | `sqlite` (default) |
//! | `postgres://…` / `postgresql://…` | PostgreSQL, shared by many nodes ([`postgres::PgStore`]) | `postgres` |
//! | `mysql://…` | MariaDB 10.6+ (MySQL protocol), shared by many nodes ([`mysql::MysqlStore`]) | `mysql` |
//! | `redis://…` | Redis 7 sorted sets and Lua claims, shared by many nodes ([`redis::RedisStore`]) | `redis` |
//! | `redisson://…` | Redisson's `RDelayedQueue` keys, shared with Java services ([`redisson::RedissonStore`]) | `redisson` |
//!
//! Later backends (Redis, brokers) add rows here and arms to [`open`].

use std::sync::Arc;

pub use overdue_core::{
    Capabilities, Claimed, Clock, DeadLetter, DeadLetterQuery, DueBuckets, DueHistogram, NodeLease, Error, Firing, Limits, ListQuery,
    ManualClock, Outcome, QueueCount, Result, Settlement, Store, SystemClock, Timer, TimerRef,
    TimerSpec, TimerState, limits, Delivery, DueSink, ExternalTrigger,
};
/// A URL without its password, for messages and logs.
pub use overdue_core::shared::redact as redact_url;
pub use overdue_engine::{
    Engine, EngineBuilder, EngineConfig, EngineStats, Handler, LatenessSummary, QueueConfig, RECENT_WINDOW,
    ShutdownReport, TriggerKind, queue_label,
};

/// The hierarchical timing wheel.
pub mod wheel {
    pub use overdue_wheel::*;
}

/// The embedded SQLite store.
#[cfg(feature = "sqlite")]
pub mod sqlite {
    pub use overdue_sql::sqlite::*;
}

/// The PostgreSQL store.
#[cfg(feature = "postgres")]
pub mod postgres {
    pub use overdue_postgres::*;
}

/// The MySQL-protocol store.
#[cfg(feature = "mysql")]
pub mod mysql {
    pub use overdue_mysql::*;
}

/// The Redis sorted-set store.
#[cfg(feature = "redis")]
pub mod redis {
    pub use overdue_redis::*;
}

/// The Redisson RDelayedQueue-compatible store.
#[cfg(feature = "redisson")]
pub mod redisson {
    pub use overdue_redisson::*;
}

/// The RabbitMQ triggers (`amqp://…?mode=dlx|delayed`): the broker waits, a SQL store with its
/// outbox stays the source of truth.
#[cfg(feature = "rabbitmq")]
pub mod rabbitmq {
    pub use overdue_rabbitmq::*;
}

/// The Kafka trigger (`kafka://…`): level topics wait, a SQL store with its outbox stays the
/// source of truth.
#[cfg(feature = "kafka")]
pub mod kafka {
    pub use overdue_kafka::*;
}

/// The RocketMQ trigger (`rocketmq://…?mode=timer|levels`): timer messages or delay levels wait,
/// a SQL store with its outbox stays the source of truth.
#[cfg(feature = "rocketmq")]
pub mod rocketmq {
    pub use overdue_rocketmq::*;
}

/// The default store URL: an SQLite file under `./overdue-data/`.
pub const DEFAULT_STORE_URL: &str = "sqlite:overdue-data/overdue.db";

/// Every scheme some build of overdue understands.
const KNOWN_SCHEMES: &[&str] =
    &["sqlite", "postgres", "postgresql", "mysql", "redis", "redisson", "amqp", "kafka", "rocketmq"];

/// The URL forms this build can open.
pub fn built_in() -> Vec<&'static str> {
    let mut v = Vec::new();
    if cfg!(feature = "sqlite") {
        v.push("sqlite:PATH");
    }
    if cfg!(feature = "postgres") {
        v.push("postgres://HOST/DB");
    }
    if cfg!(feature = "mysql") {
        v.push("mysql://HOST/DB");
    }
    if cfg!(feature = "redis") {
        v.push("redis://HOST:PORT/DB");
    }
    if cfg!(feature = "redisson") {
        v.push("redisson://HOST:PORT/DB?queue=NAME&codec=string|json|bytes");
    }
    v
}

/// Opens the store a URL names. Unknown or not-compiled-in schemes are a clear
/// [`Error::Config`].
pub async fn open(url: &str) -> Result<Arc<dyn Store>> {
    let scheme = url.split_once(':').map(|(s, _)| s).unwrap_or("");
    match scheme {
        #[cfg(feature = "sqlite")]
        "sqlite" => Ok(Arc::new(overdue_sql::sqlite::SqliteStore::open_url(url).await?)),
        #[cfg(feature = "postgres")]
        "postgres" | "postgresql" => Ok(Arc::new(overdue_postgres::PgStore::open_url(url).await?)),
        #[cfg(feature = "mysql")]
        "mysql" => Ok(Arc::new(overdue_mysql::MysqlStore::open_url(url).await?)),
        #[cfg(feature = "redis")]
        "redis" => Ok(Arc::new(overdue_redis::RedisStore::open_url(url).await?)),
        #[cfg(feature = "redisson")]
        "redisson" => Ok(Arc::new(overdue_redisson::RedissonStore::open_url(url).await?)),
        #[cfg(feature = "rabbitmq")]
        "amqp" => Err(Error::Config(
            "amqp:// is a trigger, not a store: RabbitMQ waits, a SQL store keeps the timers; use an SQL store URL \
             with --trigger amqp --trigger-url amqp://… (overdue bench also takes --backend amqp://…, meaning the \
             default SQLite store with its outbox plus that trigger)"
                .to_owned(),
        )),
        #[cfg(feature = "kafka")]
        "kafka" => Err(Error::Config(
            "kafka:// is a trigger, not a store: Kafka waits, a SQL store keeps the timers; use an SQL store URL \
             with --trigger kafka --trigger-url kafka://… (overdue serve and bench also take --backend kafka://…, \
             meaning the default SQLite store with its outbox plus that trigger)"
                .to_owned(),
        )),
        #[cfg(feature = "rocketmq")]
        "rocketmq" => Err(Error::Config(
            "rocketmq:// is a trigger, not a store: RocketMQ waits, a SQL store keeps the timers; use an SQL store \
             URL with --trigger rocketmq --trigger-url rocketmq://… (overdue serve and bench also take --backend \
             rocketmq://…, meaning the default SQLite store with its outbox plus that trigger)"
                .to_owned(),
        )),
        _ if KNOWN_SCHEMES.contains(&scheme) => {
            Err(Error::Config(format!(
                "the {scheme}:// backend is not built into this version of overdue (build it with the cargo \
                 feature of that name); built in: {}",
                built_in().join(", ")
            )))
        }
        _ => Err(Error::Config(format!(
            "cannot tell the backend from {url:?}: expected a URL such as sqlite:overdue-data/overdue.db"
        ))),
    }
}
