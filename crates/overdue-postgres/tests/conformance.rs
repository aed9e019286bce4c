//! The PostgreSQL store against the shared contract, under each trigger. Each test gets its own
//! schema on the server at `OVERDUE_TEST_POSTGRES` (default 127.0.0.1:5432, database `test`).

mod common;

overdue_testkit::conformance_tests_per_trigger!(crate::common::Pg::fresh);

/// The external-trigger path (outbox relay → broker → generation-fenced delivery → ack after
/// settle) with the store's outbox on and the in-process loopback broker.
mod loopback {
    overdue_testkit::conformance_tests!(match crate::common::Pg::loopback().await {
        Some(backend) => backend,
        None => return,
    });
}
