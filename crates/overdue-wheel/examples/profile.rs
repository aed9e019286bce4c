//! Times the phases of one 1-hour workload, for profiling: `cargo run --release -p
//! overdue-wheel --example profile -- N [big|ms|cancel|reinsert|drop] [repeats] [span]`.

use std::time::Instant;

use overdue_wheel::Wheel;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// One hour of 1 ms ticks.
const HOUR: u64 = 3_600_000;

fn main() {
    let mut args = std::env::args().skip(1);
    let n: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10_000_000);
    let mode = args.next().unwrap_or_else(|| "big".to_owned());
    let repeats: u32 = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let span: u64 = args.next().and_then(|a| a.parse().ok()).unwrap_or(HOUR);
    let mut rng = SmallRng::seed_from_u64(1);
    let deadlines: Vec<u64> = (0..n).map(|_| rng.random_range(1..=span)).collect();

    let mut insert = std::time::Duration::ZERO;
    let mut run = std::time::Duration::ZERO;
    let mut fired = 0usize;
    for _ in 0..repeats {
        let start = Instant::now();
        let mut wheel = Wheel::new();
        let mut keys: Vec<_> = deadlines.iter().map(|&d| wheel.insert(d, d)).collect();
        insert += start.elapsed();

        let start = Instant::now();
        if mode == "ms" {
            for now in 1..=span {
                wheel.poll(now, |_, _, v| fired += std::hint::black_box(v) as usize & 1);
            }
        } else if mode == "drop" {
            let t = Instant::now();
            drop(std::mem::take(&mut wheel));
            println!(
                "drop of a full wheel: {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
        } else if mode == "reinsert" {
            // Steady state: empty all but one timer (so the arena is kept), then insert n - 1
            // timers again into entries that are already allocated and faulted in.
            for &k in &keys[1..] {
                wheel.remove(k);
            }
            let t = Instant::now();
            for (i, &d) in deadlines[1..].iter().enumerate() {
                keys[i + 1] = wheel.insert(d, d);
            }
            let reinsert = t.elapsed();
            println!(
                "reinsert only: {:.1} ns/op",
                reinsert.as_nanos() as f64 / (n - 1) as f64
            );
            fired += wheel.len();
        } else if mode == "cancel" {
            keys.shuffle(&mut rng);
            for &k in &keys {
                fired += std::hint::black_box(wheel.remove(k)).map_or(0, |v| v as usize & 1);
            }
        } else {
            wheel.poll(span, |_, _, v| {
                fired += std::hint::black_box(v) as usize & 1
            });
        }
        run += start.elapsed();
    }
    let n = n * repeats as usize;
    println!(
        "n={n} insert {:.1} ns/op, {mode} {:.1} ns/timer ({fired})",
        insert.as_nanos() as f64 / n as f64,
        run.as_nanos() as f64 / n as f64
    );
}
