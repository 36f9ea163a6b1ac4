//! Command-line flags: runtime choices only; the pipeline lives in the config file.

use std::path::PathBuf;

use clap::{Parser, Subcommand};

/// Move astronomy alert streams from Kafka to Google Cloud Pub/Sub.
#[derive(Debug, Parser)]
#[command(name = "ztfhook", version, about)]
pub struct Cli {
    /// The configuration file (TOML).
    #[arg(
        long,
        short,
        global = true,
        default_value = "config/local.toml",
        env = "ZTFHOOK_CONFIG"
    )]
    pub config: PathBuf,

    /// Log filter, e.g. `info`, `debug`, `ztfhook=debug,librdkafka=warn`.
    #[arg(long, global = true, default_value = "info", env = "ZTFHOOK_LOG")]
    pub log: String,

    #[command(subcommand)]
    pub command: Option<Command>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the bridge (the default).
    Run,
    /// Validate the configuration file and print it (secrets redacted).
    CheckConfig,
}
