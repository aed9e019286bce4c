//! The PostgreSQL store against the shared contract, under each trigger. Each test gets its own
//! schema on the server at `OVERDUE_TEST_POSTGRES` (default 127.0.0.1:5432, database `test`).

mod common;

macro_rules! pg_conformance {
    ($trigger:ident) => {
        mod $trigger {
            use overdue_engine::TriggerKind;
            overdue_testkit::conformance_tests!(match crate::common::Pg::fresh(TriggerKind::Wheel).await {
                Some(mut b) => {
                    b.trigger = super::trigger(stringify!($trigger));
                    b
                }
                None => return,
            });
        }
    };
}

fn trigger(name: &str) -> overdue_engine::TriggerKind {
    match name {
        "heap" => overdue_engine::TriggerKind::Heap,
        "scan" => overdue_engine::TriggerKind::Scan,
        _ => overdue_engine::TriggerKind::Wheel,
    }
}

pg_conformance!(wheel);
pg_conformance!(heap);
pg_conformance!(scan);
