//! The command line of `agentfleet-worker`, in the library so test harnesses run the very same code.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::Worker;
use agentfleet::config::Config;
use agentfleet::shutdown::shutdown_token;
use agentfleet::telemetry;
use clap::Parser;

/// Runs agent steps from RabbitMQ.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The config file.
    #[arg(long, env = "AGENTFLEET_CONFIG", default_value = "agentfleet.toml")]
    config: PathBuf,
    /// Where to serve `/metrics` (overrides `worker.metrics_listen`; one per process on a host).
    #[arg(long, env = "AGENTFLEET_METRICS_LISTEN")]
    metrics_listen: Option<String>,
}

/// Parses the command line, loads the config and runs the worker until SIGTERM or SIGINT.
#[tokio::main]
pub async fn main() -> ExitCode {
    let args = Args::parse();
    let env = |k: &str| std::env::var(k).ok();
    let cfg = match Config::load(&args.config, &env) {
        Ok(mut cfg) => {
            if let Some(listen) = args.metrics_listen {
                cfg.worker.metrics_listen = listen;
            }
            cfg
        }
        Err(e) => {
            eprintln!("agentfleet-worker: {e}");
            return ExitCode::from(2);
        }
    };
    let telemetry = match telemetry::init(&cfg.telemetry, "agentfleet-worker") {
        Ok(t) => t,
        Err(e) => {
            eprintln!("agentfleet-worker: {e}");
            return ExitCode::from(2);
        }
    };
    telemetry::set_redaction(cfg.secrets(&env), cfg.telemetry.redact_fields.clone());
    let code = match run(cfg, &env).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "worker failed");
            eprintln!("agentfleet-worker: {e:#}");
            ExitCode::FAILURE
        }
    };
    telemetry.flush().await;
    code
}

async fn run(cfg: Config, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    if !cfg.worker.metrics_listen.is_empty() {
        let addr = cfg.worker.metrics_listen.parse().map_err(|e| anyhow::anyhow!("worker.metrics_listen: {e}"))?;
        telemetry::install_metrics(Some(addr)).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
    }
    let shutdown = shutdown_token();
    Worker::build(cfg, env).await?.run(shutdown).await
}
