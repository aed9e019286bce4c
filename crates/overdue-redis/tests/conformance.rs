//! The Redis store against the shared contract, under each trigger. Each test gets its own key
//! prefix on the server at `OVERDUE_TEST_REDIS` (default 127.0.0.1:6379) and deletes its keys
//! at the end.

mod common;

macro_rules! redis_conformance {
    ($trigger:ident) => {
        mod $trigger {
            use overdue_engine::TriggerKind;
            overdue_testkit::conformance_tests!(match crate::common::Rd::fresh(TriggerKind::Wheel).await {
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

redis_conformance!(wheel);
redis_conformance!(heap);
redis_conformance!(scan);
