//! The `overdue` command. Parses options and hands over; the work is in the modules.

mod bench;
mod crash_worker;
mod demo;
mod util;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// overdue: timers that fire once, on time.
#[derive(Debug, Parser)]
#[command(name = "overdue", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure schedule and fire throughput, lateness and memory on a backend.
    Bench(bench::BenchArgs),
    /// A simulated shop on the embedded store: orders close on time unless paid.
    Demo(demo::DemoArgs),
    /// Used by the crash-safety test: schedules and fires timers until killed.
    #[command(hide = true, name = "crash-worker")]
    CrashWorker(crash_worker::CrashArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    util::init_tracing();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = rt.block_on(async move {
        match cli.command {
            Command::Bench(args) => bench::run(args).await,
            Command::Demo(args) => demo::run(args).await,
            Command::CrashWorker(args) => crash_worker::run(args).await,
        }
    });
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
