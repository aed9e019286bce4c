//! The MySQL store against the shared contract, under each trigger. Each test gets its own
//! database on the server at `OVERDUE_TEST_MYSQL` (default the MariaDB at 127.0.0.1:3306).

mod common;

overdue_testkit::conformance_tests_per_trigger!(crate::common::My::fresh);
