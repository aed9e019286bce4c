//! Model test: random sequences of insert / remove / reset / advance against a `BTreeMap`.
//!
//! After every operation the wheel must agree with the model on `len`, on every key's deadline
//! and value, and on stale keys; every poll must fire exactly the timers with
//! `deadline <= max(now, elapsed)`, none early, each once, in the documented order; and
//! `next_deadline` must never be later than the earliest pending deadline.

use std::collections::BTreeMap;

use overdue_wheel::{TimerKey, Wheel};
use proptest::prelude::*;
use proptest::sample::Index;

/// How a deadline is chosen, relative to the wheel's `elapsed` when the op runs.
#[derive(Debug, Clone)]
enum When {
    /// Within level 0 or 1.
    Near(u64),
    /// Within a few levels.
    Mid(u64),
    /// Anywhere up to past the wheel's 2^42-tick range.
    Far(u64),
    /// At or before `elapsed`.
    Past(u64),
    /// An absolute tick, often an extreme one.
    Absolute(u64),
}

/// How far a poll moves the clock.
#[derive(Debug, Clone)]
enum Step {
    Small(u64),
    Medium(u64),
    Large(u64),
    /// To an absolute tick (may be behind `elapsed`).
    To(u64),
}

#[derive(Debug, Clone)]
enum Op {
    Insert(When),
    Remove(Index),
    Reset(Index, When),
    Poll(Step),
}

fn when() -> impl Strategy<Value = When> {
    prop_oneof![
        4 => (0u64..130).prop_map(When::Near),
        3 => (0u64..300_000).prop_map(When::Mid),
        2 => (0u64..1 << 45).prop_map(When::Far),
        1 => (0u64..100).prop_map(When::Past),
        1 => prop_oneof![
            Just(u64::MAX),
            Just(u64::MAX - 1),
            Just(u64::MAX / 2),
            Just(1u64 << 42),
            Just((1u64 << 42) - 1),
            Just(3u64 << 42 | 5),
            Just(1u64 << 63),
            any::<u64>(),
        ]
        .prop_map(When::Absolute),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        4 => (0u64..70).prop_map(Step::Small),
        3 => (0u64..5_000).prop_map(Step::Medium),
        2 => (0u64..1 << 44).prop_map(Step::Large),
        1 => prop_oneof![
            Just(u64::MAX / 2),
            Just(u64::MAX),
            Just(1u64 << 43),
            any::<u64>(),
        ]
        .prop_map(Step::To),
    ]
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        5 => when().prop_map(Op::Insert),
        2 => any::<Index>().prop_map(Op::Remove),
        2 => (any::<Index>(), when()).prop_map(|(i, w)| Op::Reset(i, w)),
        3 => step().prop_map(Op::Poll),
    ]
}

fn resolve(when: &When, elapsed: u64) -> u64 {
    match *when {
        When::Near(d) | When::Mid(d) | When::Far(d) => elapsed.saturating_add(d),
        When::Past(d) => elapsed.saturating_sub(d),
        When::Absolute(d) => d,
    }
}

/// Runs `ops` on a wheel and on the model, checking after each op.
fn run(ops: &[Op]) -> Result<(), TestCaseError> {
    let mut wheel: Wheel<u64> = Wheel::new();
    // id -> deadline of every pending timer.
    let mut model: BTreeMap<u64, u64> = BTreeMap::new();
    // Every key ever handed out, by id (the id is also the timer's value).
    let mut keys: Vec<TimerKey> = Vec::new();

    for op in ops {
        match op {
            Op::Insert(when) => {
                let deadline = resolve(when, wheel.elapsed());
                let id = keys.len() as u64;
                keys.push(wheel.insert(deadline, id));
                model.insert(id, deadline);
            }
            Op::Remove(index) if !keys.is_empty() => {
                let id = index.index(keys.len());
                let got = wheel.remove(keys[id]);
                let want = model.remove(&(id as u64)).map(|_| id as u64);
                prop_assert_eq!(got, want, "remove of id {}", id);
            }
            Op::Reset(index, when) if !keys.is_empty() => {
                let id = index.index(keys.len());
                let deadline = resolve(when, wheel.elapsed());
                let live = model.contains_key(&(id as u64));
                prop_assert_eq!(wheel.reset(keys[id], deadline), live, "reset of id {}", id);
                if live {
                    model.insert(id as u64, deadline);
                }
            }
            Op::Remove(_) | Op::Reset(..) => {}
            Op::Poll(step) => {
                let before = wheel.elapsed();
                let now = match *step {
                    Step::Small(n) | Step::Medium(n) | Step::Large(n) => before.saturating_add(n),
                    Step::To(t) => t,
                };
                let limit = now.max(before);
                let mut fired: Vec<(u64, u64)> = Vec::new();
                let mut key_ok = true;
                wheel.poll(now, |key, deadline, id| {
                    key_ok &= keys.get(id as usize) == Some(&key);
                    fired.push((id, deadline));
                });
                prop_assert!(key_ok, "a fired key does not match the key handed out");
                prop_assert_eq!(wheel.elapsed(), limit);

                let mut want: Vec<(u64, u64)> = model
                    .iter()
                    .filter(|&(_, &d)| d <= limit)
                    .map(|(&id, &d)| (id, d))
                    .collect();
                for &(id, _) in &want {
                    model.remove(&id);
                }
                // Order: overdue timers first, then non-decreasing deadlines.
                let overdue = fired.iter().take_while(|&&(_, d)| d <= before).count();
                prop_assert!(
                    fired[overdue..].iter().all(|&(_, d)| d > before),
                    "an overdue timer fired after a newer one: {:?}",
                    fired
                );
                prop_assert!(
                    fired[overdue..].windows(2).all(|w| w[0].1 <= w[1].1),
                    "out of deadline order: {:?}",
                    fired
                );
                let mut got = fired;
                got.sort_unstable();
                want.sort_unstable();
                prop_assert_eq!(got, want, "fired set at poll({}) from {}", now, before);
            }
        }

        prop_assert_eq!(wheel.len(), model.len());
        prop_assert_eq!(wheel.is_empty(), model.is_empty());
        let earliest = model.values().min().copied();
        match (wheel.next_deadline(), earliest) {
            (None, None) => {}
            (Some(next), Some(earliest)) => {
                prop_assert!(
                    next <= earliest,
                    "next_deadline {} > earliest {}",
                    next,
                    earliest
                );
                if earliest > wheel.elapsed() {
                    prop_assert!(next > wheel.elapsed(), "next_deadline {} not ahead", next);
                }
            }
            (next, earliest) => {
                prop_assert!(
                    false,
                    "next_deadline {:?} with earliest {:?}",
                    next,
                    earliest
                )
            }
        }
        for (id, key) in keys.iter().enumerate() {
            let want = model.get(&(id as u64)).copied();
            prop_assert_eq!(wheel.deadline(*key), want, "deadline of id {}", id);
            prop_assert_eq!(wheel.get(*key).copied(), want.map(|_| id as u64));
        }
    }

    // Drain: everything left fires by the end of time.
    let mut rest = 0;
    wheel.poll(u64::MAX, |_, _, _| rest += 1);
    prop_assert_eq!(rest, model.len());
    prop_assert!(wheel.is_empty());
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, ..ProptestConfig::default() })]

    #[test]
    fn wheel_matches_btreemap_model(ops in prop::collection::vec(op(), 1..250)) {
        run(&ops)?;
    }
}

/// A long deterministic run mixing all operations, to reach states proptest's short sequences
/// rarely do (thousands of live timers spread over every level).
#[test]
fn long_mixed_run_matches_model() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, TestRng, TestRunner};

    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::deterministic_rng(proptest::test_runner::RngAlgorithm::ChaCha),
    );
    for _ in 0..4 {
        let ops = prop::collection::vec(op(), 5_000)
            .new_tree(&mut runner)
            .map(|tree| tree.current())
            .unwrap_or_default();
        assert_eq!(ops.len(), 5_000);
        if let Err(e) = run(&ops) {
            panic!("{e}");
        }
    }
}
