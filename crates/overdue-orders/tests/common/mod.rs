//! A shop in virtual time: a fresh database (a SQLite temp file, a PostgreSQL schema or a MySQL
//! database), the engine on a manual clock, the order service. `every_backend!` runs a test on
//! each of them.
#![allow(dead_code)]

use std::sync::Arc;

use overdue::{Clock, Engine, Firing, ManualClock, Store, Timer};
use overdue_orders::*;
use overdue_sql::{Durability, SqliteOptions, SqliteStore};

#[allow(unused_imports)]
pub use overdue_testkit::every_backend;
pub use overdue_testkit::servers::Db;

/// Virtual start of every test: 2023-11-14T22:13:20Z.
pub const T0: i64 = 1_700_000_000_000;
pub const MIN: i64 = 60_000;
pub const DAY: i64 = 86_400_000;

pub struct Shop {
    pub svc: Arc<OrderService>,
    pub engine: Arc<Engine>,
    pub clock: ManualClock,
    pub db: Db,
    /// The SQLite file's directory (kept for the shop's lifetime); `None` on a server.
    pub dir: Option<tempfile::TempDir>,
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
        Shop::on_with(Db::Sqlite, cfg, clock, svc_clock).await.expect("sqlite needs no server")
    }

    /// A shop with the default config on `db`; `None` when its server is unreachable outside CI.
    pub async fn on(db: Db) -> Option<Shop> {
        let clock = ManualClock::new(T0);
        Shop::on_with(db, OrderConfig::default(), clock.clone(), Arc::new(clock)).await
    }

    pub async fn on_with(db: Db, cfg: OrderConfig, clock: ManualClock, svc_clock: Arc<dyn Clock>) -> Option<Shop> {
        let (backend, store, dir): (OrderBackend, Arc<dyn Store>, _) = match db {
            Db::Sqlite => {
                let dir = tempfile::tempdir().expect("tempdir");
                let store =
                    SqliteStore::open(dir.path().join("shop.db"), SqliteOptions::with_durability(Durability::Buffer))
                        .await
                        .expect("open store");
                (store.clone().into(), Arc::new(store), Some(dir))
            }
            Db::Postgres => {
                let url = overdue_testkit::servers::postgres::fresh_url("").await?;
                let store = overdue_postgres::PgStore::open_url(&url).await.expect("open postgres store");
                (store.clone().into(), Arc::new(store), None)
            }
            Db::Mysql => {
                let url = overdue_testkit::servers::mysql::fresh_url("").await?;
                let store = overdue_mysql::MysqlStore::open_url(&url).await.expect("open mysql store");
                (store.clone().into(), Arc::new(store), None)
            }
            Db::Redis => {
                let url = overdue_testkit::servers::redis::fresh_url().await?;
                let timers = overdue_redis::RedisStore::open_url(&url).await.expect("open redis store");
                let dir = tempfile::tempdir().expect("tempdir");
                let orders =
                    SqliteStore::open(dir.path().join("orders.db"), SqliteOptions::with_durability(Durability::Buffer))
                        .await
                        .expect("open order store");
                (OrderBackend::SqliteRelayed(orders), Arc::new(timers), Some(dir))
            }
        };
        let svc = OrderService::open(backend, svc_clock, cfg).await.expect("open service");
        let builder = Engine::builder(store).clock(Arc::new(clock.clone()));
        let engine = Arc::new(svc.register_handlers(builder).start().await.expect("start engine"));
        svc.attach(engine.clone());
        Some(Shop { svc, engine, clock, db, dir })
    }

    /// The service's in-process transition counters agree with the `order_events` rows of its
    /// (fresh, unshared) database: every committed transition counted once, nothing else counted.
    pub async fn assert_transitions_counted(&self) {
        let in_db = self.svc.transition_counts().await.expect("transition counts");
        let counted: Vec<(String, u64)> =
            self.svc.transitions_committed().into_iter().map(|(k, n)| (k.to_owned(), n)).collect();
        assert_eq!(counted, in_db, "transitions counted in process vs order_events rows");
    }

    /// Relays pending timer changes to the timer store (orders in SQLite, timers in Redis); a
    /// no-op elsewhere.
    pub async fn flush(&self) {
        self.svc.flush_timers().await.expect("relay timers");
    }

    /// Sets virtual time and lets the engine fire everything due (and, with relayed timers,
    /// relays what the firings changed, until nothing is left).
    pub async fn at(&self, t: i64) {
        self.flush().await;
        self.clock.set(t);
        loop {
            self.engine.settle().await;
            if self.svc.flush_timers().await.expect("relay timers") == 0 {
                break;
            }
        }
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
        self.flush().await;
        self.engine.get(queue, key).await.expect("get timer")
    }

    pub async fn stock(&self, id: &str) -> i64 {
        self.svc.get_product(id).await.expect("product").stock
    }

    pub async fn kinds(&self, id: &str) -> Vec<String> {
        self.svc.order_events(id).await.expect("events").into_iter().map(|e| e.kind).collect()
    }

    /// The invariant check, and the in-process transition counters against the events.
    pub async fn assert_invariants(&self) {
        let report = self.svc.check_invariants(0).await.expect("check invariants");
        assert!(report.ok(), "invariant broken: {report:?}");
        self.assert_transitions_counted().await;
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
