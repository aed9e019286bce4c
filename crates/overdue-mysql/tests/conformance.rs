//! The MySQL store against the shared contract, under each trigger. Each test gets its own
//! database on the server at `OVERDUE_TEST_MYSQL` (default the MariaDB at 127.0.0.1:3306).

mod common;

overdue_testkit::conformance_tests_per_trigger!(crate::common::My::fresh);

/// The external-trigger path (outbox relay → broker → generation-fenced delivery → ack after
/// settle) with the store's outbox on and the in-process loopback broker.
mod loopback {
    overdue_testkit::conformance_tests!(match crate::common::My::loopback().await {
        Some(backend) => backend,
        None => return,
    });
}
