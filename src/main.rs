use std::process::ExitCode;

use clap::Parser;
use sluice::config::{Cli, Command};
use sluice::startup::StartError;

/// jemalloc rather than glibc's malloc: a `/api/data` request allocates its documents on
/// its worker thread, and the flusher frees them, hundreds at a time, on whichever worker
/// runs it. In the request's profile glibc's malloc and free took a fifth of its CPU, more
/// than all of sluice's own code; jemalloc's thread caches take about half as much
/// (docs/results/2026-12-03-allocator.md). Its background threads (the crate's
/// `background_threads` feature) purge freed memory on a timer, not only when the pod
/// next allocates: the HPA scales on memory, so an idle pod must give back what a load
/// took.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Exit codes: 0 done, 1 runtime failure, 2 bad configuration.
fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = cli.config.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // The operator subcommands print for a person; only problems should interleave.
    let level = match cli.command {
        None | Some(Command::Serve) => cli.config.log.log_level.as_str(),
        Some(_) => "warn",
    };
    sluice::telemetry::init(cli.config.log.log_format, level);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async move {
        match cli.command.unwrap_or(Command::Serve) {
            Command::Serve => match sluice::startup::run(cli.config).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e @ StartError::Config(_)) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    tracing::error!(error = %e, "sluice stopped");
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
            Command::Check => match sluice::operator::check(&cli.config).await {
                Ok(true) => ExitCode::SUCCESS,
                Ok(false) => ExitCode::FAILURE,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
            },
            Command::Status { url, json } => match sluice::operator::status(&url, json).await {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::FAILURE
                }
            },
        }
    })
}
