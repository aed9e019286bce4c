//! # overdue-testkit
//!
//! One conformance suite, every backend. A backend crate adds, in `tests/conformance.rs`:
//!
//! ```ignore
//! overdue_testkit::conformance_tests!(MyBackend::fresh(TriggerKind::Wheel));
//! ```
//!
//! where the expression builds a fresh [`Backend`] (its own database, schema or key prefix) for
//! each test. The macro expands to one `#[tokio::test]` per clause of the contract, so a failure
//! names the clause. Every test runs in virtual time on a [`ManualClock`]: it moves the clock and
//! calls [`Engine::settle`], and never sleeps to wait for a timer.
//!
//! The clauses are the `pub async fn`s of [`suite`].

pub mod loopback;
pub mod memory;
pub mod outage;
pub mod outbox_store;
pub mod outbox_suite;
pub mod servers;
pub mod suite;

use std::sync::Arc;

use futures::future::BoxFuture;
pub use overdue_core::ManualClock;
use overdue_core::{Firing, Outcome, Result, Store};
pub use overdue_engine::TriggerKind;
use overdue_engine::{Engine, EngineConfig, QueueConfig};
use parking_lot::Mutex;

/// Polls `cond` every 5 ms until it holds, panicking with `what` after `within`: how the broker
/// tests wait for something the broker does in real time (never a fixed sleep).
pub async fn until(what: &str, within: std::time::Duration, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + within;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {within:?} waiting for: {what}");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}

/// A backend under test: how to open (and re-open) its store, and which trigger to run.
pub trait Backend: Send + Sync + 'static {
    /// Name for messages, e.g. `sqlite/wheel`.
    fn name(&self) -> String;
    /// Trigger to run the engine with.
    fn trigger(&self) -> TriggerKind;
    /// Opens the store. Called again after a simulated crash: a durable backend must then see
    /// everything that was acknowledged before.
    fn open(&self) -> BoxFuture<'_, Result<Arc<dyn Store>>>;
    /// The external trigger (broker, key expiry) to run instead of the in-process one, if any.
    /// Called once per engine start (again after a simulated crash). The store from
    /// [`Backend::open`] must then have its outbox on (see `overdue_core::trigger`).
    ///
    /// Under a manual clock a broker still waits in real time: a notice published at virtual
    /// `t` for `due_at` comes back after `due_at - t` real milliseconds, and the engine holds
    /// early arrivals until the virtual clock reaches their due time. Virtual jumps far beyond
    /// the broker's wait are served by the backstop sweep, as a lost message would be.
    fn external(&self) -> Option<Arc<dyn overdue_core::ExternalTrigger>> {
        None
    }
}

/// The fixed start of virtual time in every conformance test: 2023-11-14T22:13:20Z.
pub const T0: i64 = 1_700_000_000_000;

/// What a recording handler saw.
#[derive(Clone, Debug, Default)]
pub struct Recorder {
    firings: Arc<Mutex<Vec<Firing>>>,
}

impl Recorder {
    /// Everything fired so far, in handler start order.
    pub fn firings(&self) -> Vec<Firing> {
        self.firings.lock().clone()
    }

    /// Keys fired so far, in order.
    pub fn keys(&self) -> Vec<String> {
        self.firings.lock().iter().map(|f| f.key.clone()).collect()
    }

    /// Number of firings.
    pub fn len(&self) -> usize {
        self.firings.lock().len()
    }

    /// True if nothing fired.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// A handler that records and then returns `outcome(firing)`.
    pub fn handler(
        &self,
        outcome: impl Fn(&Firing) -> Outcome + Send + Sync + 'static,
    ) -> impl Fn(Firing) -> BoxFuture<'static, Outcome> + Send + Sync + 'static {
        let firings = self.firings.clone();
        move |f: Firing| {
            let out = outcome(&f);
            firings.lock().push(f);
            Box::pin(async move { out }) as BoxFuture<'static, Outcome>
        }
    }
}

/// A started engine in virtual time with one recording queue, `q`.
#[derive(Debug)]
pub struct Harness {
    pub engine: Engine,
    pub clock: ManualClock,
    pub recorder: Recorder,
}

/// The queue the harness records.
pub const Q: &str = "q";

impl Harness {
    /// Starts an engine on `backend` whose queue `q` records and answers `Done`.
    pub async fn start(backend: &dyn Backend) -> Harness {
        Self::start_with(backend, QueueConfig::default(), |_| Outcome::Done).await
    }

    /// Starts an engine with a custom queue config and outcome for queue `q`.
    pub async fn start_with(
        backend: &dyn Backend,
        queue: QueueConfig,
        outcome: impl Fn(&Firing) -> Outcome + Send + Sync + 'static,
    ) -> Harness {
        Self::start_at(backend, ManualClock::new(T0), queue, outcome).await
    }

    /// Starts on an existing clock (used after a simulated crash).
    pub async fn start_at(
        backend: &dyn Backend,
        clock: ManualClock,
        queue: QueueConfig,
        outcome: impl Fn(&Firing) -> Outcome + Send + Sync + 'static,
    ) -> Harness {
        let store = match backend.open().await {
            Ok(s) => s,
            Err(e) => panic!("{}: opening the store failed: {e}", backend.name()),
        };
        let recorder = Recorder::default();
        let config = EngineConfig { trigger: backend.trigger(), ..EngineConfig::default() };
        let mut builder = Engine::builder(store)
            .clock(Arc::new(clock.clone()))
            .config(config)
            .handler(Q, queue, recorder.handler(outcome));
        if let Some(t) = backend.external() {
            builder = builder.external_trigger(t);
        }
        let engine = match builder.start().await
        {
            Ok(e) => e,
            Err(e) => panic!("{}: starting the engine failed: {e}", backend.name()),
        };
        Harness { engine, clock, recorder }
    }

    /// Sets the virtual time to `t` and lets the engine handle everything due.
    pub async fn at(&self, t: i64) {
        self.clock.set(t);
        self.engine.settle().await;
    }
}

/// For a backend on a server: one module per trigger (`wheel`, `heap`, `scan`), each with the
/// whole suite on a backend from `$fresh(trigger).await`, an `Option` — `None` (server
/// unreachable outside CI) skips the test. `$fresh` is a path, e.g. `crate::common::Pg::fresh`.
#[macro_export]
macro_rules! conformance_tests_per_trigger {
    ($fresh:path) => {
        $crate::conformance_tests_per_trigger!(@one $fresh; wheel, Wheel);
        $crate::conformance_tests_per_trigger!(@one $fresh; heap, Heap);
        $crate::conformance_tests_per_trigger!(@one $fresh; scan, Scan);
    };
    (@one $fresh:path; $module:ident, $kind:ident) => {
        mod $module {
            $crate::conformance_tests!(match $fresh($crate::TriggerKind::$kind).await {
                Some(backend) => backend,
                None => return,
            });
        }
    };
}

/// Expands to one `#[tokio::test]` per clause of the contract, each on a fresh backend built
/// by `$make`.
#[macro_export]
macro_rules! conformance_tests {
    ($make:expr) => {
        $crate::conformance_tests!(@each $make;
            fires_at_due_time_never_early,
            past_due_fires_at_once,
            upsert_replaces_payload_and_bumps_generation,
            cancel_prevents_firing,
            reschedule_moves_due_and_keeps_payload,
            stale_generation_is_never_claimed,
            generations_are_never_reused,
            fires_in_due_order,
            payload_round_trips,
            retry_backs_off_then_dead_letters_then_replays,
            explicit_retry_delay_is_honoured,
            panicking_handler_is_a_failure,
            unknown_queue_is_dead_lettered_with_a_clear_error,
            bad_input_is_rejected_and_changes_nothing,
            batch_is_atomic_and_listable,
            due_histogram_buckets_unclaimed_timers,
            far_future_timers_wait_in_the_store,
            fire_now_fires_at_once,
            restart_recovers_every_timer,
            shutdown_releases_in_flight_for_redelivery,
        );
    };
    (@each $make:expr; $($name:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() {
                let backend = $make;
                $crate::suite::$name(&backend).await;
            }
        )*
    };
}
