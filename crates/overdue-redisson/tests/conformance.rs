//! The Redisson-layout store against the shared contract, under each trigger. Each test gets its
//! own side-key prefix and Redisson name prefix on the server at `OVERDUE_TEST_REDIS` (default
//! 127.0.0.1:6379) and deletes its keys at the end.

mod common;

overdue_testkit::conformance_tests_per_trigger!(crate::common::Rs::fresh);
