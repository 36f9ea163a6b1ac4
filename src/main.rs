//! The `ztfhook` binary: parse flags, set up logging, call the library, and
//! turn its result into an exit code (0 ok, 1 runtime error, 2 bad config).

mod cli;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ztfhook::config::Config;
use ztfhook::hook::Passthrough;
use ztfhook::shutdown::Shutdown;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let config = match Config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztfhook: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(cli::Command::Run) {
        cli::Command::CheckConfig => {
            println!("{config:#?}");
            ExitCode::SUCCESS
        }
        cli::Command::Run => {
            let shutdown = Arc::new(Shutdown::new());
            match ztfhook::pipeline::run(config, Arc::new(Passthrough), shutdown) {
                Ok(summary) => {
                    tracing::info!(
                        "stopped: consumed {} published {} dropped {} dead-lettered {}",
                        summary.consumed,
                        summary.published,
                        summary.dropped,
                        summary.dead_lettered
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("ztfhook: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
    }
}
