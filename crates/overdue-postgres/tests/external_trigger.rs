//! A real engine over the PostgreSQL store with its outbox on, driven by the in-process
//! loopback broker (`overdue_testkit::loopback`): notices go out through the outbox relay, come
//! back through `deliver`, are fenced by generation and acknowledged after the settlement
//! commits. Two nodes sharing one schema, each with its own relay and broker, fire every timer
//! once.
//! The cases are `overdue_testkit::outbox_suite`'s; this file opens the store.

mod common;

use std::sync::Arc;

use futures::future::BoxFuture;
use overdue_core::Store;
use overdue_postgres::PgStore;
use overdue_testkit::outbox_suite;

fn open(url: String) -> BoxFuture<'static, Arc<dyn Store>> {
    Box::pin(
        async move { Arc::new(PgStore::open_url(&url).await.expect("open")) as Arc<dyn Store> },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_timers_come_back_through_the_broker_and_the_outbox_drains() {
    let Some(url) = common::fresh_url("&outbox=true").await else {
        return;
    };
    outbox_suite::due_timers_come_back_through_the_broker_and_the_outbox_drains(open, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_timer_is_fenced_and_a_retry_is_published_again() {
    let Some(url) = common::fresh_url("&outbox=true").await else {
        return;
    };
    outbox_suite::a_cancelled_timer_is_fenced_and_a_retry_is_published_again(open, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_nodes_relaying_one_outbox_fire_every_timer_once() {
    let Some(url) = common::fresh_url("&outbox=true").await else {
        return;
    };
    outbox_suite::two_nodes_relaying_one_outbox_fire_every_timer_once(open, &url).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_without_its_outbox_is_refused_by_an_external_trigger() {
    let Some(url) = common::fresh_url("").await else {
        return;
    };
    outbox_suite::a_store_without_its_outbox_is_refused_by_an_external_trigger(open, &url).await;
}
