//! The reference in-memory store against the contract, under each trigger.

use std::sync::Arc;

use futures::future::BoxFuture;
use overdue_core::{Result, Store};
use overdue_engine::TriggerKind;
use overdue_testkit::Backend;
use overdue_testkit::memory::MemoryStore;

/// A fresh in-memory store per test (re-opening returns the same one).
struct Memory(TriggerKind, Arc<MemoryStore>);

impl Backend for Memory {
    fn name(&self) -> String {
        format!("memory/{}", self.0)
    }
    fn trigger(&self) -> TriggerKind {
        self.0
    }
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>> {
        let s: Arc<dyn Store> = self.1.clone();
        Box::pin(async move { Ok(s) })
    }
}

mod wheel {
    overdue_testkit::conformance_tests!(super::Memory(super::TriggerKind::Wheel, Default::default()));
}
mod heap {
    overdue_testkit::conformance_tests!(super::Memory(super::TriggerKind::Heap, Default::default()));
}
mod scan {
    overdue_testkit::conformance_tests!(super::Memory(super::TriggerKind::Scan, Default::default()));
}
