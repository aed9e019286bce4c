//! `cargo bench -p overdue-wheel`: our `Wheel` against `tokio_util::time::DelayQueue`.
//!
//! For N = 1M and 10M timers (`T = u64`) with deadlines drawn uniformly from one hour of 1 ms
//! ticks (1..=3 600 000), in the same run:
//!
//! * `insert/{wheel,delay_queue}/N`: build a structure of N timers from empty (`new()`, so
//!   growth is included). DelayQueue gets absolute deadlines too (`insert_at` from one base
//!   `Instant`), so it does not pay for reading the clock per insert.
//! * `insert_steady/…/N`: the steady state: fill a structure with N timers, remove all but one
//!   (so its storage is kept), then time inserting the N - 1 again (no growth, no page faults).
//! * `cancel/…/N`: remove all N, in random order, from a full structure.
//! * `expiry/…/N`: advance across the whole hour in one step and fire everything.
//!   `expiry/wheel_per_ms/N` polls every millisecond instead (3.6M polls), as an engine would.
//! * bytes per pending timer: printed to stdout (`memory:` lines) — ours from `memory_bytes()`
//!   and from the counting allocator below, DelayQueue's from the counting allocator.
//!
//! Criterion reports time per N operations and throughput in elements/s; divide the time by N
//! for ns/op. Sample size 10, flat sampling, short warm-up: the whole run takes a few minutes on
//! 2 cores.

// The counting global allocator must `unsafe impl GlobalAlloc`; it only forwards to `System`
// and adds up sizes. Nothing else in this file is unsafe.
#![allow(unsafe_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use criterion::{Criterion, SamplingMode, Throughput, criterion_group, criterion_main};
use overdue_wheel::Wheel;
use rand::rngs::SmallRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use tokio_util::time::DelayQueue;

/// Global allocator that keeps a running total of live heap bytes.
struct CountingAlloc;

/// Live heap bytes allocated through [`CountingAlloc`].
static LIVE_BYTES: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every method forwards to `System` with the caller's arguments unchanged; the counter
// has no effect on the memory handed out.
unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let ptr = unsafe { System.alloc_zeroed(layout) };
        if !ptr.is_null() {
            LIVE_BYTES.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as our caller's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: same contract as our caller's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE_BYTES.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE_BYTES.fetch_add(new_size, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

/// One hour of 1 ms ticks.
const HOUR: u64 = 3_600_000;

/// Numbers of timers benchmarked.
const SIZES: [usize; 2] = [1_000_000, 10_000_000];

/// `n` deadlines uniform over `1..=HOUR`, the same for every structure.
fn deadlines(n: usize) -> Vec<u64> {
    let mut rng = SmallRng::seed_from_u64(0x0dd_5eed);
    (0..n).map(|_| rng.random_range(1..=HOUR)).collect()
}

/// A random permutation of `0..n`: the cancel order.
fn cancel_order(n: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    order.shuffle(&mut SmallRng::seed_from_u64(0xca9ce1));
    order
}

fn build_wheel(deadlines: &[u64]) -> (Wheel<u64>, Vec<overdue_wheel::TimerKey>) {
    let mut wheel = Wheel::new();
    let keys = deadlines
        .iter()
        .enumerate()
        .map(|(i, &d)| wheel.insert(d, i as u64))
        .collect();
    (wheel, keys)
}

/// A current-thread runtime with a paused clock; DelayQueue needs one to create its `Sleep`.
fn paused_runtime() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .start_paused(true)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => panic!("cannot build a tokio runtime: {e}"),
    }
}

fn build_delay_queue(
    deadlines: &[u64],
) -> (DelayQueue<u64>, Vec<tokio_util::time::delay_queue::Key>) {
    let mut queue = DelayQueue::new();
    let base = tokio::time::Instant::now();
    let keys = deadlines
        .iter()
        .enumerate()
        .map(|(i, &d)| queue.insert_at(i as u64, base + Duration::from_millis(d)))
        .collect();
    (queue, keys)
}

fn configure(group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>) {
    group.sample_size(10);
    group.sampling_mode(SamplingMode::Flat);
    group.warm_up_time(Duration::from_millis(300));
    group.measurement_time(Duration::from_secs(2));
}

fn insert(c: &mut Criterion) {
    let mut group = c.benchmark_group("insert");
    configure(&mut group);
    for n in SIZES {
        let deadlines = deadlines(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("wheel/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let start = Instant::now();
                    let mut wheel = Wheel::new();
                    for (i, &d) in deadlines.iter().enumerate() {
                        black_box(wheel.insert(d, i as u64));
                    }
                    total += start.elapsed();
                    drop(black_box(wheel));
                }
                total
            });
        });
        let rt = paused_runtime();
        let _guard = rt.enter();
        group.bench_function(format!("delay_queue/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let base = tokio::time::Instant::now();
                    let start = Instant::now();
                    let mut queue = DelayQueue::new();
                    for (i, &d) in deadlines.iter().enumerate() {
                        black_box(queue.insert_at(i as u64, base + Duration::from_millis(d)));
                    }
                    total += start.elapsed();
                    drop(black_box(queue));
                }
                total
            });
        });
    }
    group.finish();
}

fn insert_steady(c: &mut Criterion) {
    let mut group = c.benchmark_group("insert_steady");
    configure(&mut group);
    for n in SIZES {
        let deadlines = deadlines(n);
        group.throughput(Throughput::Elements(n as u64 - 1));
        group.bench_function(format!("wheel/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut wheel, keys) = build_wheel(&deadlines);
                    for &key in &keys[1..] {
                        wheel.remove(key);
                    }
                    let start = Instant::now();
                    for (i, &d) in deadlines[1..].iter().enumerate() {
                        black_box(wheel.insert(d, i as u64));
                    }
                    total += start.elapsed();
                    assert_eq!(wheel.len(), n);
                }
                total
            });
        });
        let rt = paused_runtime();
        let _guard = rt.enter();
        group.bench_function(format!("delay_queue/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut queue, keys) = build_delay_queue(&deadlines);
                    for key in &keys[1..] {
                        queue.remove(key);
                    }
                    let base = tokio::time::Instant::now();
                    let start = Instant::now();
                    for (i, &d) in deadlines[1..].iter().enumerate() {
                        black_box(queue.insert_at(i as u64, base + Duration::from_millis(d)));
                    }
                    total += start.elapsed();
                    assert_eq!(queue.len(), n);
                }
                total
            });
        });
    }
    group.finish();
}

fn cancel(c: &mut Criterion) {
    let mut group = c.benchmark_group("cancel");
    configure(&mut group);
    for n in SIZES {
        let deadlines = deadlines(n);
        let order = cancel_order(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("wheel/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut wheel, keys) = build_wheel(&deadlines);
                    let keys: Vec<_> = order.iter().map(|&i| keys[i]).collect();
                    let start = Instant::now();
                    for &key in &keys {
                        black_box(wheel.remove(key));
                    }
                    total += start.elapsed();
                    assert!(wheel.is_empty());
                }
                total
            });
        });
        let rt = paused_runtime();
        let _guard = rt.enter();
        group.bench_function(format!("delay_queue/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut queue, keys) = build_delay_queue(&deadlines);
                    let keys: Vec<_> = order.iter().map(|&i| keys[i]).collect();
                    let start = Instant::now();
                    for key in &keys {
                        black_box(queue.remove(key));
                    }
                    total += start.elapsed();
                    assert!(queue.is_empty());
                }
                total
            });
        });
    }
    group.finish();
}

fn expiry(c: &mut Criterion) {
    let mut group = c.benchmark_group("expiry");
    configure(&mut group);
    for n in SIZES {
        let deadlines = deadlines(n);
        group.throughput(Throughput::Elements(n as u64));
        group.bench_function(format!("wheel/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut wheel, keys) = build_wheel(&deadlines);
                    drop(keys);
                    let mut fired = 0usize;
                    let start = Instant::now();
                    wheel.poll(HOUR, |key, deadline, value| {
                        black_box((key, deadline, value));
                        fired += 1;
                    });
                    total += start.elapsed();
                    assert_eq!(fired, n);
                }
                total
            });
        });
        group.bench_function(format!("wheel_per_ms/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut wheel, keys) = build_wheel(&deadlines);
                    drop(keys);
                    let mut fired = 0usize;
                    let start = Instant::now();
                    for now in 1..=HOUR {
                        wheel.poll(now, |key, deadline, value| {
                            black_box((key, deadline, value));
                            fired += 1;
                        });
                    }
                    total += start.elapsed();
                    assert_eq!(fired, n);
                }
                total
            });
        });
        let rt = paused_runtime();
        let _guard = rt.enter();
        group.bench_function(format!("delay_queue/{n}"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let (mut queue, keys) = build_delay_queue(&deadlines);
                    drop(keys);
                    let mut cx = Context::from_waker(Waker::noop());
                    let mut fired = 0usize;
                    let start = Instant::now();
                    rt.block_on(tokio::time::advance(Duration::from_millis(HOUR + 1)));
                    while let Poll::Ready(Some(expired)) = queue.poll_expired(&mut cx) {
                        black_box(expired.into_inner());
                        fired += 1;
                    }
                    total += start.elapsed();
                    assert_eq!(fired, n, "DelayQueue stopped early");
                }
                total
            });
        });
    }
    group.finish();
}

/// Prints heap bytes per pending timer (not a timed benchmark).
fn memory(_c: &mut Criterion) {
    for n in SIZES {
        let deadlines = deadlines(n);

        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let mut wheel = Wheel::new();
        for (i, &d) in deadlines.iter().enumerate() {
            wheel.insert(d, i as u64);
        }
        let counted = LIVE_BYTES.load(Ordering::Relaxed) - before;
        let reported = wheel.memory_bytes();
        println!(
            "memory: wheel/{n}: {:.2} B/timer by memory_bytes() ({reported} B), \
             {:.2} B/timer by the counting allocator",
            reported as f64 / n as f64,
            counted as f64 / n as f64,
        );
        drop(wheel);

        let rt = paused_runtime();
        let _guard = rt.enter();
        let base = tokio::time::Instant::now();
        let before = LIVE_BYTES.load(Ordering::Relaxed);
        let mut queue = DelayQueue::new();
        for (i, &d) in deadlines.iter().enumerate() {
            queue.insert_at(i as u64, base + Duration::from_millis(d));
        }
        let counted = LIVE_BYTES.load(Ordering::Relaxed) - before;
        println!(
            "memory: delay_queue/{n}: {:.2} B/timer by the counting allocator ({counted} B)",
            counted as f64 / n as f64,
        );
        drop(queue);
    }
}

criterion_group!(benches, memory, insert, insert_steady, cancel, expiry);
criterion_main!(benches);
