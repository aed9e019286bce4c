//! A shop in virtual time: a temp database, the engine on a manual clock, the order service.
#![allow(dead_code)]

use std::sync::Arc;

use overdue::{Clock, Engine, Firing, ManualClock, Timer};
use overdue_orders::*;
use overdue_sql::{Durability, SqliteOptions, SqliteStore};

/// Virtual start of every test: 2023-11-14T22:13:20Z.
pub const T0: i64 = 1_700_000_000_000;
pub const MIN: i64 = 60_000;
pub const DAY: i64 = 86_400_000;

pub struct Shop {
    pub svc: Arc<OrderService>,
    pub engine: Arc<Engine>,
    pub clock: ManualClock,
    pub store: SqliteStore,
    pub dir: tempfile::TempDir,
}

impl Shop {
    pub async fn start() -> Shop {
        Shop::with(OrderConfig::default()).await
    }

    pub async fn with(cfg: OrderConfig) -> Shop {
        let clock = ManualClock::new(T0);
        Shop::with_clocks(cfg, clock.clone(), Arc::new(clock)).await
    }

    /// The engine runs on `clock`; the service reads time from `svc_clock` (which should
    /// follow `clock`, e.g. wrap it).
    pub async fn with_clocks(cfg: OrderConfig, clock: ManualClock, svc_clock: Arc<dyn Clock>) -> Shop {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = SqliteStore::open(dir.path().join("shop.db"), SqliteOptions::with_durability(Durability::Buffer))
            .await
            .expect("open store");
        let svc = OrderService::open(store.clone(), svc_clock, cfg).await.expect("open service");
        let builder = Engine::builder(Arc::new(store.clone())).clock(Arc::new(clock.clone()));
        let engine = Arc::new(svc.register_handlers(builder).start().await.expect("start engine"));
        svc.attach(engine.clone());
        Shop { svc, engine, clock, store, dir }
    }

    /// Sets virtual time and lets the engine fire everything due.
    pub async fn at(&self, t: i64) {
        self.clock.set(t);
        self.engine.settle().await;
    }

    pub async fn product(&self, id: &str, price_cents: i64, stock: i64) -> Product {
        self.svc
            .create_product(NewProduct { id: Some(id.into()), name: format!("product {id}"), price_cents, stock })
            .await
            .expect("create product")
    }

    pub async fn order(&self, buyer: &str, lines: &[(&str, i64)]) -> Order {
        self.svc.create_order(new_order(buyer, lines)).await.expect("create order")
    }

    pub async fn timer(&self, queue: &str, key: &str) -> Option<Timer> {
        self.engine.get(queue, key).await.expect("get timer")
    }

    pub async fn stock(&self, id: &str) -> i64 {
        self.svc.get_product(id).await.expect("product").stock
    }

    pub async fn kinds(&self, id: &str) -> Vec<String> {
        self.svc.order_events(id).await.expect("events").into_iter().map(|e| e.kind).collect()
    }

    pub async fn assert_invariants(&self) {
        let report = self.svc.check_invariants(0).await.expect("check invariants");
        assert!(report.ok(), "invariant broken: {report:?}");
    }
}

pub fn new_order(buyer: &str, lines: &[(&str, i64)]) -> NewOrder {
    NewOrder {
        buyer: buyer.into(),
        items: lines.iter().map(|(p, q)| NewItem { product_id: (*p).into(), quantity: *q }).collect(),
        pay_timeout_ms: None,
    }
}

/// A firing as the engine would hand it over.
pub fn firing(queue: &str, key: &str, due_at: i64, fired_at: i64) -> Firing {
    Firing { queue: queue.into(), key: key.into(), generation: 1, due_at, payload: Vec::new(), attempt: 1, fired_at }
}
