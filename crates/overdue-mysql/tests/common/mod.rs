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
}

impl My {
    pub async fn fresh(trigger: TriggerKind) -> Option<My> {
        let url = fresh_url("").await?;
        let node = database_of(&url);
        let sep = if url.contains('?') { '&' } else { '?' };
        Some(My {
            trigger,
            url: format!("{url}{sep}node={node}"),
        })
    }
}

impl Backend for My {
    fn name(&self) -> String {
        format!("mysql/{}", self.trigger)
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        Box::pin(
            async move { Ok(Arc::new(MysqlStore::open_url(&self.url).await?) as Arc<dyn Store>) },
        )
    }
}
