//! What every Kafka test shares: the broker address, a fresh prefix (topics and group) per test,
//! a conformance backend, and the rule that under `CI` an unreachable broker fails the test
//! instead of skipping it.
//!
//! The topics are left on the broker: tansu 0.6 panics (and stops serving) when a consumer
//! fetches from a topic deleted under it, and a conformance test that simulates a crash leaves
//! its consumer closing in the background. `scripts/brokers.sh restart kafka` (what CI runs)
//! starts from an empty store.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use overdue_core::{ExternalTrigger, Result, Store};
use overdue_engine::TriggerKind;
use overdue_kafka::{KafkaOptions, KafkaTrigger};
use overdue_sql::{SqliteOptions, SqliteStore};
use overdue_testkit::Backend;

/// The broker the tests use: `OVERDUE_TEST_KAFKA` (host:port), or the one on 127.0.0.1.
pub fn brokers() -> String {
    std::env::var("OVERDUE_TEST_KAFKA").unwrap_or_else(|_| "127.0.0.1:9092".to_owned())
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() as u32
}

/// A fresh prefix on the test broker.
pub struct Fresh {
    pub prefix: String,
    pub partitions: i32,
}

impl Fresh {
    /// A fresh prefix, or `None` (test skipped) when the broker is unreachable outside CI.
    /// Under `CI` an unreachable broker panics.
    pub async fn new() -> Option<Fresh> {
        let addr = brokers().split(',').next().unwrap_or("127.0.0.1:9092").to_owned();
        let reachable = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&addr)).await;
        if !matches!(reachable, Ok(Ok(_))) {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the Kafka broker at {addr} cannot be reached (scripts/brokers.sh start kafka)");
            }
            eprintln!("skipped: no Kafka broker at {addr}; start one with scripts/brokers.sh, or set CI to make this a failure");
            return None;
        }
        let ms = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        Some(Fresh { prefix: format!("ot-{ms}-{:08x}", rand_u32()), partitions: 2 })
    }

    pub fn options(&self) -> KafkaOptions {
        // A short session: a test that drops a consumer without closing it does not hold its
        // partitions for long.
        KafkaOptions { prefix: self.prefix.clone(), partitions: self.partitions, session_timeout_ms: 6_000, ..KafkaOptions::default() }
    }

    /// A new trigger on this prefix.
    pub fn trigger(&self) -> KafkaTrigger {
        KafkaTrigger::new(&brokers(), self.options()).expect("a kafka trigger")
    }
}

/// A conformance backend: a fresh SQLite store (outbox on) in its own directory and a trigger
/// on a fresh prefix (the same prefix again after a simulated crash).
pub struct Kafka {
    pub fresh: Fresh,
    dir: tempfile::TempDir,
}

impl Kafka {
    pub async fn fresh() -> Option<Kafka> {
        Some(Kafka { fresh: Fresh::new().await?, dir: tempfile::tempdir().expect("temporary directory") })
    }

    pub async fn store(&self) -> SqliteStore {
        SqliteStore::open(self.dir.path().join("overdue.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
            .await
            .expect("open the store")
    }
}

impl Backend for Kafka {
    fn name(&self) -> String {
        "sqlite+kafka".to_owned()
    }
    fn trigger(&self) -> TriggerKind {
        TriggerKind::Wheel
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(async move { Ok(Arc::new(self.store().await) as Arc<dyn Store>) })
    }
    fn external(&self) -> Option<Arc<dyn ExternalTrigger>> {
        Some(Arc::new(self.fresh.trigger()))
    }
}

pub use overdue_testkit::until;
