//! The outbox (`?outbox=true`): every write that gives a timer a new generation or a new due
//! time records a notice in the same statement; `outbox_fetch` reads them oldest first without
//! waiting for other nodes; `outbox_ack` deletes exactly the given rows. With the outbox off
//! nothing is written and a relay is refused. The cases that need only the `Store` trait are
//! `overdue_testkit::outbox_store`'s (shared with the other SQL store); this file opens the store
//! and keeps the cases that need its own SQL.

mod common;

use std::time::Duration;

use overdue_core::{DeadLetterQuery, Error, Settlement, Store, TimerRef, TimerSpec};
use overdue_postgres::PgStore;
use overdue_testkit::outbox_store;

const NOW: i64 = 1_700_000_000_000;

async fn store(outbox: bool) -> Option<PgStore> {
    let url = common::fresh_url(if outbox { "&outbox=true" } else { "" }).await?;
    Some(PgStore::open_url(&url).await.expect("open"))
}

fn spec(key: &str, due_at: i64) -> TimerSpec {
    TimerSpec::new("q", key, due_at).with_payload(key.as_bytes().to_vec())
}

fn notice(key: &str, generation: u64, due_at: i64) -> TimerRef {
    TimerRef { queue: "q".into(), key: key.into(), generation, due_at }
}

async fn notices(s: &PgStore) -> Vec<TimerRef> {
    s.outbox_fetch(10_000).await.expect("fetch").into_iter().map(|(_, n)| n).collect()
}

async fn rows_in_outbox(s: &PgStore) -> i64 {
    sqlx::query_scalar("SELECT COUNT(*) FROM overdue_outbox").fetch_one(s.pool()).await.expect("count")
}

#[tokio::test]
async fn an_upsert_writes_one_notice_per_new_generation() {
    let Some(s) = store(true).await else { return };
    assert!(s.outbox());
    outbox_store::an_upsert_writes_one_notice_per_new_generation(&s).await;
}

#[tokio::test]
async fn a_failing_batch_writes_no_notice() {
    let Some(s) = store(true).await else { return };
    // A duplicate identity makes the one upsert statement fail: neither timers nor notices.
    let e = s.schedule(vec![spec("x", NOW), spec("y", NOW), spec("x", NOW)], NOW).await.expect_err("duplicate");
    assert!(!e.is_transient(), "{e}");
    assert_eq!(rows_in_outbox(&s).await, 0);
    assert!(s.get("q", "y", NOW).await.expect("get").is_none());

    // In the caller's transaction: a rollback takes the notices with it, a commit keeps them.
    let mut tx = s.pool().begin().await.expect("begin");
    s.schedule_in(&mut tx, vec![spec("r1", NOW), spec("r2", NOW)], NOW).await.expect("schedule_in");
    tx.rollback().await.expect("rollback");
    assert_eq!(rows_in_outbox(&s).await, 0, "rolled back with the caller's transaction");
    let mut tx = s.pool().begin().await.expect("begin");
    let gens = s.schedule_in(&mut tx, vec![spec("c1", NOW + 5)], NOW).await.expect("schedule_in");
    assert_eq!(rows_in_outbox(&s).await, 0, "not visible before the commit");
    tx.commit().await.expect("commit");
    assert_eq!(notices(&s).await, vec![notice("c1", gens[0], NOW + 5)]);
}

#[tokio::test]
async fn fetch_is_oldest_first_and_ack_deletes_only_those_rows() {
    let Some(s) = store(true).await else { return };
    outbox_store::fetch_is_oldest_first_and_ack_deletes_only_those_rows(&s).await;
}

#[tokio::test]
async fn reschedule_retry_and_replay_write_notices() {
    let Some(s) = store(true).await else { return };
    outbox_store::reschedule_retry_and_replay_write_notices(&s).await;
}

#[tokio::test]
async fn with_the_outbox_off_nothing_is_written_and_a_relay_is_refused() {
    let Some(s) = store(false).await else { return };
    assert!(!s.outbox());
    let g = s.schedule(vec![spec("a", NOW), spec("b", NOW)], NOW).await.expect("schedule");
    let g1 = s.reschedule("q", "a", NOW, NOW).await.expect("reschedule").expect("exists");
    let a = notice("a", g1, NOW);
    s.claim(std::slice::from_ref(&a), "me", NOW, NOW + 1000).await.expect("claim");
    s.settle(vec![Settlement::Retry { timer: a, due_at: NOW + 5, attempts: 1, error: "e".into() }], NOW)
        .await
        .expect("retry");
    let b = notice("b", g[1], NOW);
    s.claim(std::slice::from_ref(&b), "me", NOW, NOW + 1000).await.expect("claim");
    s.settle(vec![Settlement::DeadLetter { timer: b, attempts: 1, error: "e".into(), failed_at: NOW }], NOW)
        .await
        .expect("dead letter");
    let id = s.dead_letters(&DeadLetterQuery::default()).await.expect("dead letters")[0].id;
    s.replay(id, NOW, NOW).await.expect("replay").expect("replayed");
    let mut tx = s.pool().begin().await.expect("begin");
    s.schedule_in(&mut tx, vec![spec("c", NOW)], NOW).await.expect("schedule_in");
    tx.commit().await.expect("commit");
    assert_eq!(rows_in_outbox(&s).await, 0, "the outbox is off");
    for e in [s.outbox_fetch(10).await.expect_err("no outbox"), s.outbox_ack(&[1]).await.expect_err("no outbox")] {
        assert!(matches!(e, Error::Config(_)), "{e}");
        assert!(e.to_string().contains("outbox=true"), "{e}");
    }
}

#[tokio::test]
async fn a_bad_outbox_value_is_a_clear_error() {
    // Refused while parsing, before any connection is attempted.
    for v in ["yes", "", "TRUE1"] {
        let e = PgStore::open_url(&format!("postgres://127.0.0.1:9/test?outbox={v}")).await.expect_err(v);
        assert!(matches!(e, Error::Config(_)), "{e}");
        let s = e.to_string();
        assert!(s.contains("invalid postgres url") && s.contains(&format!("outbox={v:?} must be true or false")), "{s}");
    }
}

#[tokio::test]
async fn one_nodes_fetch_never_waits_for_anothers_ack() {
    let Some(url) = common::fresh_url("&outbox=true").await else { return };
    let a = PgStore::open_url(&format!("{url}&node=a")).await.expect("open a");
    let b = PgStore::open_url(&format!("{url}&node=b")).await.expect("open b");
    a.schedule(vec![spec("k1", NOW), spec("k2", NOW)], NOW).await.expect("schedule");
    let rows = a.outbox_fetch(10).await.expect("fetch");
    // Node a is acknowledging k1 in a transaction that has not committed (its row is locked).
    let mut tx = a.pool().begin().await.expect("begin");
    sqlx::query("DELETE FROM overdue_outbox WHERE seq = $1").bind(rows[0].0).execute(&mut *tx).await.expect("delete");
    // Node b reads both rows at once, without waiting for a's lock.
    let seen = tokio::time::timeout(Duration::from_secs(2), b.outbox_fetch(10)).await.expect("b's fetch waited").expect("fetch");
    assert_eq!(seen, rows, "both nodes see the same rows");
    tx.commit().await.expect("commit");
    // b acknowledges both (k1 already gone): fine.
    b.outbox_ack(&rows.iter().map(|(s, _)| *s).collect::<Vec<_>>()).await.expect("ack");
    assert!(a.outbox_fetch(10).await.expect("fetch").is_empty());
}

#[tokio::test]
async fn the_outbox_table_survives_a_reopen_at_schema_version_2() {
    let Some(url) = common::fresh_url("&outbox=true").await else { return };
    let s = PgStore::open_url(&url).await.expect("open");
    s.schedule(vec![spec("k", NOW)], NOW).await.expect("schedule");
    drop(s);
    let s = PgStore::open_url(&url).await.expect("reopen");
    assert_eq!(notices(&s).await.len(), 1, "unpublished notices survive a restart");
    let v: i32 = sqlx::query_scalar("SELECT MAX(version) FROM overdue_schema").fetch_one(s.pool()).await.expect("version");
    assert_eq!(v, overdue_postgres::LATEST_VERSION);
    assert_eq!(v, 2);
}

#[tokio::test]
async fn a_version_1_database_gets_the_outbox_on_upgrade() {
    let Some(url) = common::fresh_url("").await else { return };
    let s = PgStore::open_url(&url).await.expect("open");
    let g = s.schedule(vec![spec("old", NOW)], NOW).await.expect("schedule")[0];
    // Back to the layout a build without the outbox made.
    sqlx::query("DROP TABLE overdue_outbox").execute(s.pool()).await.expect("drop");
    sqlx::query("DELETE FROM overdue_schema WHERE version = 2").execute(s.pool()).await.expect("unrecord");
    drop(s);
    let s = PgStore::open_url(&format!("{url}&outbox=true")).await.expect("upgrade");
    assert_eq!(s.get("q", "old", NOW).await.expect("get").map(|t| t.generation), Some(g), "timers kept");
    assert!(notices(&s).await.is_empty(), "timers written before the outbox have no notice");
    let g2 = s.reschedule("q", "old", NOW + 1, NOW).await.expect("reschedule").expect("exists");
    assert_eq!(notices(&s).await, vec![notice("old", g2, NOW + 1)]);
}
