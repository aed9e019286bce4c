//! Redis CPU per fired timer, without the engine: schedules N timers (one queue, all due at
//! once) under a fresh prefix, then claims them by reference in batches of 1,024 and settles
//! them `Done` in batches of 4,096, as the engine's wheel path does. Prints wall time and the
//! redis-server CPU (`INFO cpu`, user + sys) per timer for each phase, then deletes its keys.
//!
//! `cargo run --release -p overdue-redis --example fire_cost -- [N]`
//! (server: `OVERDUE_TEST_REDIS`, default `redis://127.0.0.1:6379`).

use std::time::Instant;

use overdue_core::{Settlement, Store, TimerRef, TimerSpec};
use overdue_redis::RedisStore;

async fn cpu(con: &mut redis::aio::ConnectionManager) -> f64 {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(con).await.unwrap_or_default();
    let get = |name: &str| -> f64 {
        info.lines().find_map(|l| l.strip_prefix(name)).and_then(|v| v.trim().parse().ok()).unwrap_or(0.0)
    };
    get("used_cpu_user:") + get("used_cpu_sys:")
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> overdue_core::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let base = std::env::var("OVERDUE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".to_owned());
    let prefix = format!("ofire{:06x}", rand::random::<u32>() & 0xff_ffff);
    let store = RedisStore::open_url(&format!("{base}?prefix={prefix}")).await?;
    let mut con = store.connection();
    let t0 = 1_700_000_000_000i64;
    let phase = async |name: &str, c0: f64, w0: Instant, con: &mut redis::aio::ConnectionManager| {
        let (c1, w) = (cpu(con).await, w0.elapsed().as_secs_f64());
        println!("{name:>9}: {:>8.0} timers/s wall, redis CPU {:.2} us/timer", n as f64 / w, (c1 - c0) * 1e6 / n as f64);
    };
    let (c0, w0) = (cpu(&mut con).await, Instant::now());
    let mut refs = Vec::with_capacity(n);
    for start in (0..n).step_by(1000) {
        let specs: Vec<TimerSpec> = (start..(start + 1000).min(n)).map(|i| TimerSpec::new("bench", format!("t{i}"), t0)).collect();
        let gens = store.schedule(specs.clone(), t0).await?;
        refs.extend(specs.into_iter().zip(gens).map(|(s, g)| TimerRef { queue: s.queue, key: s.key, generation: g, due_at: t0 }));
    }
    phase("schedule", c0, w0, &mut con).await;
    // Claims of 1,024 and settlements of 4,096 interleaved, at most 8,192 in flight (the
    // engine's defaults), so the in-flight sets stay the size they are in a real burst.
    let (mut claim_cpu, mut settle_cpu, w0) = (0.0, 0.0, Instant::now());
    let mut held: Vec<TimerRef> = Vec::new();
    let mut fired = 0;
    for chunk in refs.chunks(1024) {
        let c0 = cpu(&mut con).await;
        let got = store.claim(chunk, "n1", t0 + 10, t0 + 60_000).await?;
        claim_cpu += cpu(&mut con).await - c0;
        fired += got.len();
        held.extend(got.into_iter().map(|c| c.timer));
        if held.len() >= 8192 || fired == n {
            while !held.is_empty() {
                let batch: Vec<Settlement> = held.drain(..held.len().min(4096)).map(Settlement::Done).collect();
                let c0 = cpu(&mut con).await;
                store.settle(batch, t0 + 20).await?;
                settle_cpu += cpu(&mut con).await - c0;
            }
        }
    }
    assert_eq!(fired, n, "every timer claimed");
    let w = w0.elapsed().as_secs_f64();
    println!("     fire: {:>8.0} timers/s wall, redis CPU claim {:.2} + settle {:.2} us/timer", n as f64 / w, claim_cpu * 1e6 / n as f64, settle_cpu * 1e6 / n as f64);
    let k = store.queue_keys("bench");
    let g = store.global_keys();
    let mut keys: Vec<String> = k.all().iter().map(|s| (*s).to_owned()).collect();
    keys.extend(g.all().iter().map(|s| (*s).to_owned()));
    let _: i64 = redis::cmd("UNLINK").arg(&keys[..]).query_async(&mut con).await.unwrap_or(0);
    Ok(())
}
