//! The `agentfleet-dispatcher` command line: load the config, serve the API until SIGTERM.

use std::path::PathBuf;
use std::process::ExitCode;

use agentfleet::config::Config;
use agentfleet::shutdown::shutdown_token;
use agentfleet::telemetry;
use clap::Parser;

use crate::Dispatcher;

/// Serves the agentfleet HTTP API.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The config file.
    #[arg(long, env = "AGENTFLEET_CONFIG", default_value = "agentfleet.toml")]
    config: PathBuf,
}

/// Parses the command line, loads the config and serves the API until SIGTERM or SIGINT.
#[tokio::main]
pub async fn main() -> ExitCode {
    let args = Args::parse();
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match Config::load(&args.config, &env) {
        Ok(cfg) => cfg,
        Err(e) => {
            eprintln!("agentfleet-dispatcher: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init(&cfg.telemetry, "agentfleet-dispatcher") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agentfleet-dispatcher: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::set_redaction(cfg.secrets(&env), cfg.telemetry.redact_fields.clone());
    let code = match run(cfg).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "dispatcher failed");
            eprintln!("agentfleet-dispatcher: {e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.flush().await;
    code
}

async fn run(cfg: Config) -> anyhow::Result<()> {
    let metrics = telemetry::install_metrics(None).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    let shutdown = shutdown_token();
    let dispatcher = Dispatcher::build(cfg, None, Some(metrics)).await?;
    tracing::info!(addr = %dispatcher.local_addr()?, ops = %dispatcher.ops_addr()?, "dispatcher listening");
    dispatcher.run(shutdown).await
}
