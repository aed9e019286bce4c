//! What every PostgreSQL test shares: the server URL, a fresh schema per test, and the rule that
//! under `CI` an unreachable server fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::Arc;

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_postgres::PgStore;
use overdue_testkit::Backend;

#[allow(unused_imports)]
pub use overdue_testkit::servers::postgres::{fresh_schema, fresh_url, server_url};

/// A conformance backend: one schema per test, reopened under the same node name after a
/// simulated crash (a restarted node takes its partitions back at once).
pub struct Pg {
    pub trigger: TriggerKind,
    pub url: String,
    /// Run the external-trigger path with the in-process loopback broker (outbox on).
    pub loopback: bool,
}

impl Pg {
    pub async fn fresh(trigger: TriggerKind) -> Option<Pg> {
        let url = fresh_url("").await?;
        let node = url.rsplit("schema=").next().unwrap_or("node").to_owned();
        Some(Pg { trigger, url: format!("{url}&node={node}"), loopback: false })
    }

    /// The store with its outbox on, driven through the outbox relay by a
    /// [`overdue_testkit::loopback::LoopbackTrigger`] instead of an in-process trigger.
    pub async fn loopback() -> Option<Pg> {
        let pg = Pg::fresh(TriggerKind::Wheel).await?;
        Some(Pg { url: format!("{}&outbox=true", pg.url), loopback: true, ..pg })
    }
}

impl Backend for Pg {
    fn name(&self) -> String {
        if self.loopback { "postgres/loopback".to_owned() } else { format!("postgres/{}", self.trigger) }
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(async move { Ok(Arc::new(PgStore::open_url(&self.url).await?) as Arc<dyn Store>) })
    }
    fn external(&self) -> Option<Arc<dyn overdue_core::ExternalTrigger>> {
        self.loopback.then(|| Arc::new(overdue_testkit::loopback::LoopbackTrigger::new()) as _)
    }
}
