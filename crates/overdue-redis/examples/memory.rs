//! Redis memory per pending timer: schedules N timers (keys `o-<i>`, empty or small payload) in
//! one queue under a fresh prefix, reads `INFO memory` before and after, prints bytes per timer
//! and the per-key `MEMORY USAGE`, then deletes its keys.
//!
//! `cargo run --release -p overdue-redis --example memory -- [N] [PAYLOAD_BYTES]`
//! (server: `OVERDUE_TEST_REDIS`, default `redis://127.0.0.1:6379`).

use overdue_core::{Store, TimerSpec};
use overdue_redis::RedisStore;

async fn used_memory(con: &mut redis::aio::ConnectionManager) -> i64 {
    let info: String = redis::cmd("INFO").arg("memory").query_async(con).await.unwrap_or_default();
    info.lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> overdue_core::Result<()> {
    let mut args = std::env::args().skip(1);
    let n: i64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let payload: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(0);
    let base = std::env::var("OVERDUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("omem{:06x}", rand::random::<u32>() & 0xff_ffff);
    let store = RedisStore::open_url(&format!("{base}?prefix={prefix}")).await?;
    let mut con = store.connection();
    let t0 = 1_700_000_000_000i64;
    // One timer first, so the keys exist and the measurement is per added timer.
    store.schedule(vec![TimerSpec::new("order.close", "o-init", t0)], t0).await?;
    let before = used_memory(&mut con).await;
    let mut i = 0;
    while i < n {
        let batch: Vec<TimerSpec> = (i..(i + 1000).min(n))
            .map(|j| TimerSpec::new("order.close", format!("o-{j}"), t0 + 3_600_000 + j % 1_800_000).with_payload(vec![b'x'; payload]))
            .collect();
        store.schedule(batch, t0).await?;
        i += 1000;
    }
    let after = used_memory(&mut con).await;
    let k = store.queue_keys("order.close");
    let mut usage = Vec::new();
    for key in [&k.due, &k.timers] {
        let u: i64 = redis::cmd("MEMORY").arg("USAGE").arg(key).arg("SAMPLES").arg(0).query_async(&mut con).await.unwrap_or(0);
        let enc: String = redis::cmd("OBJECT").arg("ENCODING").arg(key).query_async(&mut con).await.unwrap_or_default();
        usage.push(format!("{key}: {u} bytes ({enc}), {:.1} B/timer", u as f64 / (n + 1) as f64));
    }
    println!("{n} timers, payload {payload} B: INFO used_memory grew {} bytes = {:.1} B per pending timer", after - before, (after - before) as f64 / n as f64);
    for u in usage {
        println!("  MEMORY USAGE {u}");
    }
    let g = store.global_keys();
    let keys: Vec<String> = k.all().iter().chain(g.all().iter()).map(|s| (*s).to_owned()).collect();
    let _: i64 = redis::cmd("UNLINK").arg(&keys[..]).query_async(&mut con).await.unwrap_or(0);
    Ok(())
}
