//! The `ztfhook` binary: parse flags, set up logging, call the library, and
//! turn its result into an exit code (0 ok, 1 runtime error, 2 bad config or
//! script).

mod cli;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use ztfhook::alert::{Decoder, SchemaSources};
use ztfhook::config::Config;
use ztfhook::hook::reload::ScriptHooks;
use ztfhook::hook::{Environment, Limits};
use ztfhook::hook::{HookFactory, Passthrough};
use ztfhook::shutdown::Shutdown;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_new(&cli.log).unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    if let Some(cli::Command::Check {
        topic,
        json,
        files,
        schema_dir,
        schema_registry,
    }) = &cli.command
    {
        let Some(script) = &cli.script else {
            eprintln!("ztfhook: check needs --script FILE");
            return ExitCode::from(2);
        };
        let env = Environment {
            limits: Limits::default(),
            decoder: Arc::new(Decoder::new(SchemaSources {
                directory: schema_dir.clone(),
                registry: schema_registry.clone(),
            })),
        };
        return match ztfhook::check::run(script, &env, topic.as_deref(), files, *json) {
            Ok(true) => ExitCode::SUCCESS,
            Ok(false) => ExitCode::from(1),
            Err(e) => {
                eprintln!("ztfhook: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(cli::Command::BigquerySchema {
        kafka_columns,
        schema_dir,
        schema_registry,
        source,
    }) = &cli.command
    {
        let decoder = Decoder::new(SchemaSources {
            directory: schema_dir.clone(),
            registry: schema_registry.clone(),
        });
        return match ztfhook::alert::bigquery::table_schema_of_file(
            source,
            &decoder,
            *kafka_columns,
        ) {
            Ok(columns) => {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&columns).expect("JSON prints")
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("ztfhook: {e}");
                ExitCode::from(2)
            }
        };
    }
    if let Some(cli::Command::ImportConnect {
        worker,
        connector,
        output,
    }) = &cli.command
    {
        return import_connect(worker, connector, output.as_deref());
    }
    if let Some(cli::Command::Tail {
        from_beginning,
        max,
        format,
        topics,
        bootstrap_server,
        consumer_config,
        jaas,
    }) = &cli.command
    {
        let options = ztfhook::tail::TailOptions {
            from_beginning: *from_beginning,
            max: *max,
            format: *format,
            topics: topics.clone(),
        };
        // Kafka's console consumer's arguments and files, or the config.
        let source = if bootstrap_server.is_some() || consumer_config.is_some() {
            let jaas = jaas.clone().or_else(|| {
                std::env::var("KAFKA_OPTS")
                    .ok()
                    .and_then(|o| ztfhook::tail::jaas_from_kafka_opts(&o))
            });
            match ztfhook::tail::TailSource::from_console(
                bootstrap_server.as_deref(),
                consumer_config.as_deref(),
                jaas.as_deref(),
            ) {
                Ok((source, notes)) => {
                    for n in notes {
                        tracing::info!("not used: {n}");
                    }
                    source
                }
                Err(e) => {
                    eprintln!("ztfhook: {e}");
                    return ExitCode::from(2);
                }
            }
        } else {
            match load_config(&cli.config) {
                Ok(config) => ztfhook::tail::TailSource::from_config(&config),
                Err(code) => return code,
            }
        };
        return tail(&source, &options);
    }
    let config = match load_config(&cli.config) {
        Ok(c) => c,
        Err(code) => return code,
    };
    if let Some(cli::Command::CheckConfig) = cli.command {
        println!("{config:#?}");
        return ExitCode::SUCCESS;
    }
    let script = cli.script.clone().or_else(|| config.hook.script.clone());
    let mut _watcher = None;
    let hooks: Arc<dyn HookFactory> = match script {
        None => Arc::new(Passthrough),
        Some(path) => match ScriptHooks::load(
            &path,
            Environment {
                limits: config.hook.limits,
                decoder: Arc::new(Decoder::new(config.alerts.clone())),
            },
        ) {
            Ok(hooks) => {
                match hooks.watch() {
                    Ok(w) => _watcher = Some(w),
                    Err(e) => tracing::warn!("{}: cannot watch for edits: {e}", path.display()),
                }
                Arc::new(hooks)
            }
            Err(e) => {
                eprintln!("ztfhook: {e}");
                return ExitCode::from(2);
            }
        },
    };
    let shutdown = Arc::new(Shutdown::new());
    if let Some(cli::Command::Replay {
        topic,
        checkpoint,
        from_start,
        inputs,
    }) = &cli.command
    {
        return replay(
            config,
            hooks,
            shutdown,
            inputs,
            topic.as_deref(),
            checkpoint,
            *from_start,
        );
    }
    match ztfhook::pipeline::run(config, hooks, shutdown) {
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

/// `ztfhook replay`: 0 when every input was read to its end and every
/// member resolved; 1 when one was not (or the run failed); 2 when it
/// could not start (an input missing, a checkpoint that does not fit).
fn replay(
    config: Config,
    hooks: Arc<dyn HookFactory>,
    shutdown: Arc<Shutdown>,
    paths: &[std::path::PathBuf],
    topic: Option<&str>,
    checkpoint: &std::path::Path,
    from_start: bool,
) -> ExitCode {
    use ztfhook::archive::checkpoint::Checkpoint;
    let found = match ztfhook::archive::expand(paths, topic) {
        Ok(f) => f,
        Err(e) => {
            eprintln!("ztfhook: {e}");
            return ExitCode::from(2);
        }
    };
    for (path, why) in &found.skipped {
        tracing::warn!("{}: {why}: skipped, not sent", path.display());
    }
    for input in &found.inputs {
        tracing::info!(
            "replaying {} ({} bytes) as topic `{}`",
            input.path.display(),
            input.bytes,
            input.topic
        );
    }
    let checkpoint = match Checkpoint::open(checkpoint, from_start) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ztfhook: {e}");
            return ExitCode::from(2);
        }
    };
    let skipped = found.skipped.len();
    // A dry run (`sink = "discard"`) writes no checkpoint: nothing is left unfinished by it.
    let dry_run = config.pipeline.discard;
    let outcome = ztfhook::pipeline::replay(
        config,
        hooks,
        Arc::clone(&shutdown),
        found.inputs,
        checkpoint,
    );
    let (summary, report) = match outcome {
        Ok(done) => done,
        Err(ztfhook::pipeline::ReplayError::Checkpoint(e)) => {
            eprintln!("ztfhook: {e}");
            return ExitCode::from(2);
        }
        Err(e) => {
            eprintln!("ztfhook: {e:#}");
            return ExitCode::from(1);
        }
    };
    tracing::info!(
        "replay: {} of {} inputs complete; {} members read, published {} dropped {} dead-lettered {}; {} files and members skipped (not alerts by their names)",
        report.inputs_complete,
        report.inputs,
        report.members,
        summary.published,
        summary.dropped,
        summary.dead_lettered,
        skipped as u64 + report.skipped,
    );
    for e in &report.empty {
        tracing::warn!("replay: {e}: empty");
    }
    if !dry_run {
        for u in &report.unfinished {
            tracing::warn!(
                "replay: stopped before the end of {u}; run the same command again to go on"
            );
        }
    }
    let mut ok = (dry_run || report.unfinished.is_empty()) && summary.abandoned == 0;
    for e in &report.errors {
        tracing::error!("replay: {e}");
        ok = false;
    }
    if let Some(e) = &report.checkpoint_error {
        tracing::error!("replay: the checkpoint could not be written: {e}");
        ok = false;
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    }
}

/// The configuration file, or exit code 2 with the error printed.
fn load_config(path: &std::path::Path) -> Result<Config, ExitCode> {
    Config::load(path).map_err(|e| {
        eprintln!("ztfhook: {e}");
        ExitCode::from(2)
    })
}

/// `ztfhook tail`, from either source.
fn tail(source: &ztfhook::tail::TailSource, options: &ztfhook::tail::TailOptions) -> ExitCode {
    let shutdown = Arc::new(Shutdown::new());
    // Ctrl-C stops the loop after the message in hand.
    let signals = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build();
    if let Ok(rt) = &signals {
        rt.spawn(ztfhook::shutdown::listen_for_signals(Arc::clone(&shutdown)));
    }
    match ztfhook::tail::run(source, options, &shutdown, &mut std::io::stdout()) {
        Ok(_) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ztfhook: {e}");
            ExitCode::from(1)
        }
    }
}

/// `ztfhook import-connect`.
fn import_connect(
    worker: &std::path::Path,
    connector: &std::path::Path,
    output: Option<&std::path::Path>,
) -> ExitCode {
    use ztfhook::connect::properties::Properties;
    let imported = Properties::load(worker)
        .and_then(|w| Properties::load(connector).map(|c| (w, c)))
        .map_err(ztfhook::connect::import::ImportError::from)
        .and_then(|(w, c)| ztfhook::connect::import::import(&w, &c));
    let imported = match imported {
        Ok(i) => i,
        Err(e) => {
            eprintln!("ztfhook: {e}");
            return ExitCode::from(2);
        }
    };
    match output {
        None => print!("{}", imported.toml),
        Some(path) => {
            if let Err(e) = std::fs::write(path, &imported.toml) {
                eprintln!("ztfhook: {}: {e}", path.display());
                return ExitCode::from(1);
            }
            eprintln!("ztfhook: wrote {}", path.display());
        }
    }
    for (var, what) in &imported.variables {
        eprintln!("ztfhook: set {var} before running it: {what}");
    }
    ExitCode::SUCCESS
}
