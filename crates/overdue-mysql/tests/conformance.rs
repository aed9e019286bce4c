//! The MySQL store against the shared contract, under each trigger. Each test gets its own
//! database on the server at `OVERDUE_TEST_MYSQL` (default the MariaDB at 127.0.0.1:3306).

mod common;

macro_rules! my_conformance {
    ($trigger:ident) => {
        mod $trigger {
            use overdue_engine::TriggerKind;
            overdue_testkit::conformance_tests!(match crate::common::My::fresh(TriggerKind::Wheel)
                .await
            {
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

my_conformance!(wheel);
my_conformance!(heap);
my_conformance!(scan);
