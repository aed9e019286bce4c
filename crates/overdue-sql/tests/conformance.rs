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
}

impl Sqlite {
    fn fresh(trigger: TriggerKind) -> Self {
        Sqlite { trigger, dir: tempfile::tempdir().expect("temporary directory") }
    }
}

impl Backend for Sqlite {
    fn name(&self) -> String {
        format!("sqlite/{}", self.trigger)
    }
    fn trigger(&self) -> TriggerKind {
        self.trigger
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        let path = self.dir.path().join("overdue.db");
        Box::pin(async move { Ok(Arc::new(SqliteStore::open(path, SqliteOptions::default()).await?) as Arc<dyn Store>) })
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
