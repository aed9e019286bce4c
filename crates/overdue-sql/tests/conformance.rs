//! The embedded SQLite store against the shared contract, under each trigger. Each test gets a
//! fresh database in its own temporary directory; re-opening it is how restart is simulated.

use std::sync::Arc;

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_sql::{SqliteOptions, SqliteStore};
use overdue_testkit::Backend;

struct Sqlite {
    trigger: TriggerKind,
    dir: tempfile::TempDir,
    /// Run the external-trigger path with an in-process loopback broker (outbox on).
    loopback: bool,
}

impl Sqlite {
    fn fresh(trigger: TriggerKind) -> Self {
        Sqlite { trigger, dir: tempfile::tempdir().expect("temporary directory"), loopback: false }
    }

    fn loopback() -> Self {
        Sqlite { loopback: true, ..Sqlite::fresh(TriggerKind::Wheel) }
    }
}

impl Backend for Sqlite {
    fn name(&self) -> String {
        if self.loopback { "sqlite/loopback".to_owned() } else { format!("sqlite/{}", self.trigger) }
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        let path = self.dir.path().join("overdue.db");
        let opts = SqliteOptions { outbox: self.loopback, ..SqliteOptions::default() };
        Box::pin(async move { Ok(Arc::new(SqliteStore::open(path, opts).await?) as Arc<dyn Store>) })
    }
    fn external(&self) -> Option<Arc<dyn overdue_core::ExternalTrigger>> {
        self.loopback.then(|| Arc::new(overdue_testkit::loopback::LoopbackTrigger::new()) as _)
    }
}

mod wheel {
    overdue_testkit::conformance_tests!(super::Sqlite::fresh(super::TriggerKind::Wheel));
}
mod heap {
    overdue_testkit::conformance_tests!(super::Sqlite::fresh(super::TriggerKind::Heap));
}
mod scan {
    overdue_testkit::conformance_tests!(super::Sqlite::fresh(super::TriggerKind::Scan));
}
/// The external-trigger path (outbox relay → broker → generation-fenced delivery → ack after
/// settle) with the in-process loopback broker.
mod loopback {
    overdue_testkit::conformance_tests!(super::Sqlite::loopback());
}
