//! `overdue demo`: a simulated shop running the real order service in-process on the embedded
//! store, in real time.
//!
//! It seeds products (one of them nearly sold out), then shoppers create orders at a steady pace
//! over `--spread-secs`. Every order reserves stock and gets its `order.remind` and `order.close`
//! timers in the same transaction. A share of shoppers pays at a random moment up to 20 % past the
//! deadline: a payment in time wins and cancels the timers; a late one is refused with
//! `order_closed` and the close timer closes the order and releases its stock. At the end it
//! prints a summary and checks the invariant (`OrderService::check_invariants`): stock conserved,
//! no paid order closed, no transition twice, no unpaid order past its deadline by more than
//! `--bound-ms`; plus paid + closed = created. The exit code is non-zero if anything fails.

use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use hdrhistogram::Histogram;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use overdue::TriggerKind;
use overdue_orders::{NewItem, NewOrder, NewProduct, OrderError, OrderQuery, OrderService, OrderStatus};
use overdue_server::{App, AppConfig};
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

/// Products seeded: (id, name, price in cents, stock). The last one sells out.
const PRODUCTS: [(&str, &str, i64, i64); 5] = [
    ("tea", "Oolong tea, 250 g", 1_290, 100_000),
    ("mug", "Stoneware mug", 1_850, 100_000),
    ("kettle", "Gooseneck kettle", 5_900, 100_000),
    ("scale", "Coffee scale", 3_400, 100_000),
    ("limited", "Limited-edition teapot", 12_000, 40),
];

fn bar(mp: &MultiProgress, len: u64, msg: &str) -> ProgressBar {
    let pb = mp.add(ProgressBar::new(len));
    let style = ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len}").unwrap_or_else(|_| ProgressStyle::default_bar());
    pb.set_style(style.progress_chars("=> "));
    pb.set_message(msg.to_owned());
    pb
}

/// Share of orders that ask for the limited product.
const LIMITED_SHARE: f64 = 0.05;

fn random_order(rng: &mut impl Rng) -> NewOrder {
    let lines = rng.random_range(1..=3usize);
    let (limited, regular) = PRODUCTS.split_last().map_or((None, &PRODUCTS[..]), |(l, r)| (Some(l), r));
    let mut ids: Vec<&str> = regular.iter().map(|p| p.0).collect();
    let mut items = Vec::with_capacity(lines + 1);
    for _ in 0..lines {
        let id = ids.swap_remove(rng.random_range(0..ids.len()));
        items.push(NewItem { product_id: id.to_owned(), quantity: rng.random_range(1..=3) });
    }
    if let Some(l) = limited.filter(|_| rng.random_bool(LIMITED_SHARE)) {
        items.push(NewItem { product_id: l.0.to_owned(), quantity: 1 });
    }
    NewOrder { buyer: format!("buyer-{}", rng.random_range(1..=500)), items, pay_timeout_ms: None }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    if !(0.0..=1.0).contains(&args.pay_ratio) {
        bail!("--pay-ratio must be between 0 and 1, got {}", args.pay_ratio);
    }
    if args.orders == 0 || !(1..=3_600).contains(&args.timeout_secs) || args.spread_secs > 3_600 {
        bail!("--orders must be positive, --timeout-secs within 1..=3600 and --spread-secs at most 3600");
    }
    let tmp = tempfile::tempdir().context("creating a temporary directory")?;
    let url = args.backend.clone().unwrap_or_else(|| format!("sqlite:{}", tmp.path().join("demo.db").display()));
    let mut cfg = AppConfig { backend_url: url.clone(), trigger: args.trigger, ..AppConfig::default() };
    let timeout_ms = args.timeout_secs as i64 * 1000;
    cfg.order.pay_timeout = Duration::from_millis(timeout_ms as u64);
    cfg.order.remind_before = Duration::from_millis((timeout_ms / 3) as u64);
    let app = App::start(cfg).await.with_context(|| format!("starting the order service on {url}"))?;
    let svc: Arc<OrderService> = app.orders.clone();
    for (id, name, price_cents, stock) in PRODUCTS {
        svc.create_product(NewProduct { id: Some(id.into()), name: name.into(), price_cents, stock }).await?;
    }
    let stock_before: i64 = PRODUCTS.iter().map(|p| p.3).sum();

    let mp = MultiProgress::new();
    let created_bar = bar(&mp, args.orders, "created");
    let paid_bar = bar(&mp, args.orders, "paid in time");
    let closed_bar = bar(&mp, args.orders, "closed on timeout");
    let reminded_bar = bar(&mp, args.orders, "reminded");
    let watcher = {
        let (svc, closed_bar, reminded_bar) = (svc.clone(), closed_bar.clone(), reminded_bar.clone());
        tokio::spawn(async move {
            loop {
                if let Ok(counts) = svc.status_counts().await {
                    let closed = counts.iter().find(|(s, _)| *s == OrderStatus::Closed).map_or(0, |c| c.1);
                    closed_bar.set_position(closed);
                }
                let kinds = svc.transitions_committed();
                reminded_bar.set_position(kinds.iter().find(|(k, _)| *k == "reminded").map_or(0, |c| c.1));
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        })
    };

    let started = Instant::now();
    let gap = Duration::from_secs_f64(args.spread_secs as f64 / args.orders as f64);
    let (refused_late, sold_out) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let mut payers = Vec::new();
    let mut created = 0u64;
    let mut ticker = tokio::time::interval(gap.max(Duration::from_micros(100)));
    for _ in 0..args.orders {
        ticker.tick().await;
        let (order, pay, delay) = {
            let mut rng = rand::rng();
            (random_order(&mut rng), rng.random_bool(args.pay_ratio), rng.random_range(0..timeout_ms * 6 / 5))
        };
        match svc.create_order(order).await {
            Ok(o) => {
                created += 1;
                created_bar.inc(1);
                if pay {
                    let (svc, paid_bar, refused) = (svc.clone(), paid_bar.clone(), refused_late.clone());
                    payers.push(tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_millis(delay as u64)).await;
                        match svc.pay(&o.id).await {
                            Ok(_) => paid_bar.inc(1),
                            Err(OrderError::OrderClosed { .. }) => {
                                refused.fetch_add(1, Ordering::Relaxed);
                            }
                            Err(e) => tracing::warn!(order = %o.id, error = %e, "payment failed"),
                        }
                    }));
                }
            }
            Err(OrderError::OutOfStock { .. }) => {
                sold_out.fetch_add(1, Ordering::Relaxed);
                created_bar.inc(1);
            }
            Err(e) => return Err(e).context("creating an order"),
        }
    }
    for p in payers {
        let _ = p.await;
    }
    // Every order is paid or closed once the last deadline has passed; wait for that, bounded.
    let give_up = Instant::now() + Duration::from_millis((timeout_ms + args.bound_ms) as u64 + 10_000);
    loop {
        let counts = svc.status_counts().await?;
        let open = counts.iter().find(|(s, _)| *s == OrderStatus::PendingPayment).map_or(0, |c| c.1);
        if open == 0 || Instant::now() > give_up {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.engine.settle().await;
    watcher.abort();
    let counts = svc.status_counts().await?;
    let count = |st: OrderStatus| counts.iter().find(|(s, _)| *s == st).map_or(0, |c| c.1);
    closed_bar.set_position(count(OrderStatus::Closed));
    for b in [&created_bar, &paid_bar, &closed_bar, &reminded_bar] {
        b.finish();
    }
    let elapsed = started.elapsed();

    // Close lateness, from the order events: `closed` time minus the payment deadline.
    let mut lateness = Histogram::<u64>::new_with_max(3_600_000, 3).context("histogram")?;
    let mut early = 0u64;
    let mut before: Option<String> = None;
    loop {
        let page = svc.list_orders(&OrderQuery { status: Some(OrderStatus::Closed), before: before.clone(), limit: 500, ..Default::default() }).await?;
        let Some(last) = page.last() else { break };
        before = Some(last.id.clone());
        for o in &page {
            if o.close_reason.as_deref() != Some("timeout") {
                continue;
            }
            if let Some(ev) = svc.order_events(&o.id).await?.into_iter().find(|e| e.kind == "closed") {
                let late = ev.at - o.pay_deadline;
                if late < 0 {
                    early += 1;
                }
                lateness.saturating_record(late.max(0) as u64);
            }
        }
    }
    let report = svc.check_invariants(args.bound_ms).await?;
    let products = svc.list_products(None, 100).await?;
    let stock_total: i64 = products.iter().map(|p| p.stock_total).sum();
    let stock_free: i64 = products.iter().map(|p| p.stock).sum();
    let kinds = svc.transition_counts().await?;
    let kind = |k: &str| kinds.iter().find(|(n, _)| n == k).map_or(0, |c| c.1);
    app.shutdown().await;

    let (paid, closed) = (count(OrderStatus::Paid), count(OrderStatus::Closed));
    println!();
    println!("overdue demo — {} orders over {} s, {} s payment timeout — backend {url}, trigger {}", args.orders, args.spread_secs, args.timeout_secs, args.trigger);
    let row = |k: &str, v: String| println!("{k:<44} {v:>16}");
    row("orders created", created.to_string());
    row("refused: out of stock (limited teapot)", sold_out.load(Ordering::Relaxed).to_string());
    row("paid in time", paid.to_string());
    row("payments refused: order_closed", refused_late.load(Ordering::Relaxed).to_string());
    row("closed by the payment timeout", closed.to_string());
    row("reminders sent (outbox)", kind("reminded").to_string());
    row("close lateness p50 / p99 / max (ms)", format!("{} / {} / {}", lateness.value_at_quantile(0.5), lateness.value_at_quantile(0.99), lateness.max()));
    row("stock: total / free / held by paid orders", format!("{stock_total} / {stock_free} / {}", stock_total - stock_free));
    row("elapsed (s)", format!("{:.1}", elapsed.as_secs_f64()));
    let checks = [
        ("stock is conserved (per product)".to_owned(), report.stock_mismatches.is_empty() && stock_total == stock_before),
        ("no paid order was closed".to_owned(), report.paid_and_closed.is_empty()),
        ("order status agrees with its events (no transition twice)".to_owned(), report.inconsistent.is_empty()),
        (format!("no unpaid order outlived its deadline by > {} ms", args.bound_ms), report.overdue_unpaid.is_empty() && lateness.max() as i64 <= args.bound_ms),
        ("no order closed before its deadline".to_owned(), early == 0),
        ("every order is paid or closed".to_owned(), paid + closed == created),
    ];
    println!();
    let mut ok = true;
    for (what, pass) in checks {
        println!("{} {what}", if pass { "PASS" } else { "FAIL" });
        ok &= pass;
    }
    if !ok {
        eprintln!("invariant report: {report:?}");
    }
    Ok(if ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
}
