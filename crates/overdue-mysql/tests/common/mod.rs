//! What every MySQL test shares: the server URL, a fresh database per test, and the rule that
//! under `CI` an unreachable server fails the test instead of skipping it.

#![allow(dead_code)]

use std::sync::Arc;

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_mysql::MysqlStore;
use overdue_testkit::Backend;

#[allow(unused_imports)]
pub use overdue_testkit::servers::mysql::{fresh_database, fresh_url, server_url};

/// The database named in a test URL.
pub fn database_of(url: &str) -> String {
    let base = url.split('?').next().unwrap_or(url);
    base.rsplit('/').next().unwrap_or("").to_owned()
}

/// A conformance backend: one database per test, reopened under the same node name after a
/// simulated crash (a restarted node takes its partitions back at once).
pub struct My {
    pub trigger: TriggerKind,
    pub url: String,
    /// Run the external-trigger path with the in-process loopback broker (outbox on).
    pub loopback: bool,
}

impl My {
    pub async fn fresh(trigger: TriggerKind) -> Option<My> {
        let url = fresh_url("").await?;
        let node = database_of(&url);
        let sep = if url.contains('?') { '&' } else { '?' };
        Some(My {
            trigger,
            url: format!("{url}{sep}node={node}"),
            loopback: false,
        })
    }

    /// The store with its outbox on, driven through the outbox relay by a
    /// [`overdue_testkit::loopback::LoopbackTrigger`] instead of an in-process trigger.
    pub async fn loopback() -> Option<My> {
        let my = My::fresh(TriggerKind::Wheel).await?;
        Some(My {
            url: format!("{}&outbox=true", my.url),
            loopback: true,
            ..my
        })
    }
}

impl Backend for My {
    fn name(&self) -> String {
        if self.loopback {
            "mysql/loopback".to_owned()
        } else {
            format!("mysql/{}", self.trigger)
        }
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(
            async move { Ok(Arc::new(MysqlStore::open_url(&self.url).await?) as Arc<dyn Store>) },
        )
    }
    fn external(&self) -> Option<Arc<dyn overdue_core::ExternalTrigger>> {
        self.loopback
            .then(|| Arc::new(overdue_testkit::loopback::LoopbackTrigger::new()) as _)
    }
}
