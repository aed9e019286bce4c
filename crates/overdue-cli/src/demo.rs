//! `overdue demo`: a simulated shop on the embedded store, in real time.
//!
//! Shoppers create orders at a steady pace over `--spread-secs`; each order gets an
//! `order.remind` timer (before the deadline) and an `order.close` timer (at the deadline).
//! A share of shoppers pays at a random moment up to 20 % past the deadline: a payment in time
//! wins and cancels both timers; a payment after the deadline is refused (`order_closed`), and
//! the close timer closes the order. At the end the invariant is checked: every order is paid
//! xor closed, no paid order was closed, no transition happened twice, and no unpaid order
//! outlived its deadline by more than `--bound-ms`. The exit code is non-zero if it fails.
//!
//! Orders live in memory here; the order service (with its own tables, stock and HTTP API) will
//! replace this simulation, keeping the same invariant.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use overdue::{Clock, Engine, EngineConfig, Firing, Outcome, QueueConfig, SystemClock, TimerSpec, TriggerKind};
use parking_lot::Mutex;
use rand::Rng;

/// Options of `overdue demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Orders to create.
    #[arg(long, default_value_t = 3_000)]
    orders: u64,
    /// Share of shoppers who try to pay (0..=1).
    #[arg(long, default_value_t = 0.6)]
    pay_ratio: f64,
    /// Payment timeout per order, seconds.
    #[arg(long, default_value_t = 10)]
    timeout_secs: u64,
    /// Orders are created evenly over this many seconds.
    #[arg(long, default_value_t = 10)]
    spread_secs: u64,
    /// Largest close lateness the invariant accepts, milliseconds.
    #[arg(long, default_value_t = 1_000)]
    bound_ms: i64,
    /// Store URL; default: a fresh SQLite database in a temporary directory.
    #[arg(long, env = "OVERDUE_BACKEND")]
    backend: Option<String>,
    /// Trigger: wheel, heap or scan.
    #[arg(long, default_value = "wheel")]
    trigger: TriggerKind,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Status {
    PendingPayment,
    Paid,
    Closed,
}

#[derive(Debug)]
struct Order {
    status: Status,
    deadline: i64,
    closed_late_ms: Option<i64>,
    transitions: u32,
    reminded: u32,
}

#[derive(Debug, Default)]
struct Shop {
    orders: Mutex<HashMap<String, Order>>,
    lateness: Mutex<Option<Histogram<u64>>>,
    double_transitions: Mutex<u64>,
}

impl Shop {
    /// `pending_payment → closed`, only from `pending_payment`: a repeated firing changes nothing.
    fn close(&self, id: &str, now: i64) -> bool {
        let mut orders = self.orders.lock();
        let Some(o) = orders.get_mut(id) else { return false };
        if o.status != Status::PendingPayment {
            return false;
        }
        o.status = Status::Closed;
        o.transitions += 1;
        let late = now - o.deadline;
        o.closed_late_ms = Some(late);
        if let Some(h) = self.lateness.lock().as_mut() {
            h.saturating_record(late.max(0) as u64);
        }
        true
    }

    /// `pending_payment → paid` if the deadline has not passed; `Err` names why not.
    fn pay(&self, id: &str, now: i64) -> Result<(), &'static str> {
        let mut orders = self.orders.lock();
        let o = orders.get_mut(id).ok_or("order_not_found")?;
        match o.status {
            Status::PendingPayment if now < o.deadline => {
                o.status = Status::Paid;
                o.transitions += 1;
                Ok(())
            }
            Status::PendingPayment | Status::Closed => Err("order_closed"),
            Status::Paid => Err("already_paid"),
        }
    }
}

fn bar(mp: &MultiProgress, len: u64, msg: &str) -> ProgressBar {
    let pb = mp.add(ProgressBar::new(len));
    let style = ProgressStyle::with_template("{msg:>16} [{bar:40}] {pos}/{len}").unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style.progress_chars("=> "));
    pb.set_message(msg.to_owned());
    pb
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.pay_ratio) {
        bail!("--pay-ratio must be between 0 and 1, got {}", args.pay_ratio);
    }
    if args.orders == 0 || args.timeout_secs == 0 || args.timeout_secs > 3_600 || args.spread_secs > 3_600 {
        bail!("--orders must be positive and --timeout-secs / --spread-secs at most 3600");
    }
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let url = args.backend.clone().unwrap_or_else(|| format!("sqlite:{}", tmp.path().join("demo.db").display()));
    let store = overdue::open(&url).await.with_context(|| format!("opening {url}"))?;
    let shop = Arc::new(Shop::default());
    *shop.lateness.lock() = Some(Histogram::new_with_max(3_600_000, 3).context("histogram")?);

    let mp = MultiProgress::new();
    let created_bar = bar(&mp, args.orders, "created");
    let paid_bar = bar(&mp, args.orders, "paid");
    let closed_bar = bar(&mp, args.orders, "closed on time");
    let reminded_bar = bar(&mp, args.orders, "reminded");

    let (s1, cb) = (shop.clone(), closed_bar.clone());
    let (s2, rb) = (shop.clone(), reminded_bar.clone());
    let engine = Arc::new(
        Engine::builder(store)
            .config(EngineConfig { trigger: args.trigger, ..EngineConfig::default() })
            .handler("order.close", QueueConfig::default(), move |f: Firing| {
                if s1.close(&f.key, SystemClock.now_ms()) {
                    cb.inc(1);
                }
                async { Outcome::Done }
            })
            .handler("order.remind", QueueConfig::default(), move |f: Firing| {
                let mut orders = s2.orders.lock();
                if let Some(o) = orders.get_mut(&f.key)
                    && o.status == Status::PendingPayment
                    && o.reminded == 0
                {
                    o.reminded += 1;
                    rb.inc(1);
                }
                async { Outcome::Done }
            })
            .start()
            .await?,
    );

    let started = Instant::now();
    let timeout_ms = args.timeout_secs as i64 * 1000;
    let remind_before = (timeout_ms / 3).min(300_000);
    let gap = Duration::from_secs_f64(args.spread_secs as f64 / args.orders as f64);
    let mut payers = Vec::new();
    let mut refused = 0u64;
    let mut refused_rx = Vec::new();
    for i in 0..args.orders {
        let id = format!("o-{i:06}");
        let now = SystemClock.now_ms();
        let deadline = now + timeout_ms;
        shop.orders.lock().insert(id.clone(), Order { status: Status::PendingPayment, deadline, closed_late_ms: None, transitions: 0, reminded: 0 });
        engine
            .schedule_batch(vec![
                TimerSpec::new("order.remind", id.clone(), deadline - remind_before),
                TimerSpec::new("order.close", id.clone(), deadline),
            ])
            .await?;
        created_bar.inc(1);
        let (pay, delay) = {
            let mut rng = rand::rng();
            (rng.random_bool(args.pay_ratio), rng.random_range(0..timeout_ms * 6 / 5))
        };
        if pay {
            let (shop, engine, paid_bar) = (shop.clone(), engine.clone(), paid_bar.clone());
            let (tx, rx) = tokio::sync::oneshot::channel();
            refused_rx.push(rx);
            payers.push(tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay as u64)).await;
                let outcome = shop.pay(&id, SystemClock.now_ms());
                if outcome.is_ok() {
                    paid_bar.inc(1);
                    // Paying cancels both timers; if one is already on its way, its handler
                    // finds the order paid and changes nothing.
                    let _ = engine.cancel("order.close", &id).await;
                    let _ = engine.cancel("order.remind", &id).await;
                }
                let _ = tx.send(outcome.is_err());
            }));
        }
        tokio::time::sleep(gap).await;
    }
    created_bar.finish();
    for p in payers {
        let _ = p.await;
    }
    for rx in refused_rx {
        if rx.await.unwrap_or(false) {
            refused += 1;
        }
    }
    // Wait until every order is paid or closed (bounded: the last deadline plus the bound).
    let give_up = Instant::now() + Duration::from_millis((timeout_ms + args.bound_ms + 10_000) as u64);
    loop {
        let open = shop.orders.lock().values().filter(|o| o.status == Status::PendingPayment).count();
        if open == 0 || Instant::now() > give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    engine.settle().await;
    paid_bar.finish();
    closed_bar.finish();
    reminded_bar.finish();
    let elapsed = started.elapsed();
    engine.shutdown(Duration::from_secs(5)).await;

    // The invariant.
    let orders = shop.orders.lock();
    let paid = orders.values().filter(|o| o.status == Status::Paid).count() as u64;
    let closed = orders.values().filter(|o| o.status == Status::Closed).count() as u64;
    let open = orders.values().filter(|o| o.status == Status::PendingPayment).count() as u64;
    let twice = orders.values().filter(|o| o.transitions > 1).count() as u64 + *shop.double_transitions.lock();
    let paid_closed = orders.values().filter(|o| o.status == Status::Paid && o.closed_late_ms.is_some()).count() as u64;
    let late = orders.values().filter(|o| o.closed_late_ms.is_some_and(|l| l > args.bound_ms)).count() as u64;
    let early = orders.values().filter(|o| o.closed_late_ms.is_some_and(|l| l < 0)).count() as u64;
    let h = shop.lateness.lock().take().context("histogram")?;
    drop(orders);

    println!();
    println!("overdue demo — {} orders over {} s, {} s payment timeout, backend {url}, trigger {}", args.orders, args.spread_secs, args.timeout_secs, args.trigger);
    println!("{:<40} {:>12}", "orders created", args.orders);
    println!("{:<40} {:>12}", "paid in time", paid);
    println!("{:<40} {:>12}", "payments refused (order_closed)", refused);
    println!("{:<40} {:>12}", "closed by the payment timeout", closed);
    println!("{:<40} {:>12}", "reminders sent", reminded_bar.position());
    println!("{:<40} {:>12}", "close lateness p50 / p99 / max (ms)", format!("{} / {} / {}", h.value_at_quantile(0.5), h.value_at_quantile(0.99), h.max()));
    println!("{:<40} {:>12}", "elapsed (s)", format!("{:.1}", elapsed.as_secs_f64()));
    let checks = [
        ("every order is paid or closed", open == 0),
        ("no paid order was closed", paid_closed == 0),
        ("no transition happened twice", twice == 0),
        ("no order closed before its deadline", early == 0),
        (&*format!("no unpaid order outlived its deadline by > {} ms", args.bound_ms), late == 0),
        ("paid + closed = created", paid + closed == args.orders),
    ];
    let mut ok = true;
    println!();
    for (what, pass) in checks {
        println!("{} {what}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
