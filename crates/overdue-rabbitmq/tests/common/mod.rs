//! What every RabbitMQ test shares: the broker URL, a fresh prefix per test whose exchanges and
//! queues are deleted when the test ends, a conformance backend, and the rule that under `CI` an
//! unreachable broker fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::future::BoxFuture;
use overdue_core::{ExternalTrigger, Result, Store};
use overdue_engine::TriggerKind;
use overdue_rabbitmq::{AmqpOptions, AmqpTrigger, Mode};
use overdue_sql::{SqliteOptions, SqliteStore};
use overdue_testkit::Backend;

/// The broker the tests use: `OVERDUE_TEST_AMQP`, or the one on 127.0.0.1.
pub fn server_url() -> String {
    std::env::var("OVERDUE_TEST_AMQP").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_owned())
}

/// True when the plugin-backed (`mode=delayed`) tests should run.
pub fn delayed_enabled() -> bool {
    std::env::var("OVERDUE_TEST_AMQP_DELAYED").is_ok_and(|v| v == "1")
}

fn now_ms() -> u128 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0)
}

fn rand_u32() -> u32 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish() as u32
}

/// A fresh prefix on the test broker; its exchanges and queues are deleted on drop.
pub struct Fresh {
    pub prefix: String,
    pub mode: Mode,
}

impl Fresh {
    /// A fresh prefix, or `None` (test skipped) when the broker is unreachable outside CI.
    /// Under `CI` an unreachable broker panics.
    pub async fn new(mode: Mode) -> Option<Fresh> {
        let base = server_url();
        let addr = base.trim_start_matches("amqp://").split(['/', '?']).next().unwrap_or("127.0.0.1:5672");
        let addr = addr.rsplit('@').next().unwrap_or(addr).to_owned();
        let reachable = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(&addr)).await;
        if !matches!(reachable, Ok(Ok(_))) {
            if std::env::var_os("CI").is_some() {
                panic!("CI is set but the RabbitMQ broker at {addr} cannot be reached");
            }
            eprintln!("skipped: no RabbitMQ at {addr}; set CI to make this a failure");
            return None;
        }
        Some(Fresh { prefix: format!("ot-{}-{:08x}", now_ms(), rand_u32()), mode })
    }

    pub fn options(&self) -> AmqpOptions {
        AmqpOptions { mode: self.mode, prefix: self.prefix.clone(), ..AmqpOptions::default() }
    }

    /// A new trigger on this prefix.
    pub fn trigger(&self) -> AmqpTrigger {
        AmqpTrigger::new(&server_url(), self.options())
    }
}

impl Drop for Fresh {
    fn drop(&mut self) {
        let trigger = self.trigger();
        // Drop may run inside a runtime: purge on a thread with its own.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
            if let Err(e) = rt.block_on(trigger.purge()) {
                eprintln!("deleting the test's exchanges and queues failed: {e}");
            }
        })
        .join();
    }
}

/// A conformance backend: a fresh SQLite store (outbox on) in its own directory and a trigger
/// on a fresh prefix (the same prefix again after a simulated crash).
pub struct Amqp {
    pub fresh: Fresh,
    dir: tempfile::TempDir,
}

impl Amqp {
    pub async fn fresh(mode: Mode) -> Option<Amqp> {
        Some(Amqp { fresh: Fresh::new(mode).await?, dir: tempfile::tempdir().expect("temporary directory") })
    }

    pub async fn store(&self) -> SqliteStore {
        SqliteStore::open(self.dir.path().join("overdue.db"), SqliteOptions { outbox: true, ..SqliteOptions::default() })
            .await
            .expect("open the store")
    }
}

impl Backend for Amqp {
    fn name(&self) -> String {
        format!("sqlite+amqp-{:?}", self.fresh.mode).to_lowercase()
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
