//! The command line of `agentfleet-worker`, in the library so test harnesses run the very same code.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::Worker;
use agentfleet::amqp::consumer::Consuming;
use agentfleet::config::Config;
use agentfleet::domain::Name;
use agentfleet::shutdown::shutdown_token;
use agentfleet::telemetry;
use clap::Parser;
use tokio_util::sync::CancellationToken;

/// Runs agent steps from RabbitMQ.
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// The config file.
    #[arg(long, env = "AGENTFLEET_CONFIG", default_value = "agentfleet.toml")]
    config: PathBuf,
    /// Where to serve `/metrics`, `/healthz` and `/readyz` (overrides `worker.metrics_listen`; one per process on a host).
    #[arg(long, env = "AGENTFLEET_METRICS_LISTEN")]
    metrics_listen: Option<String>,
    /// The pools to consume, comma-separated (overrides `worker.pools`): one worker Deployment
    /// per pool shares one config file.
    #[arg(long, env = "AGENTFLEET_POOLS", value_delimiter = ',', value_parser = parse_pool)]
    pools: Option<Vec<Name>>,
}

fn parse_pool(s: &str) -> Result<Name, String> {
    Name::parse(s.trim()).map_err(|e| format!("not a pool name: {e}"))
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
            if let Some(pools) = args.pools {
                cfg.worker.pools = pools;
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

/// How long the start-up count of a system prompt may take before the estimate stands.
const COUNT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// With an API key, counts each Anthropic agent's system prompt with the API's `count_tokens`
/// endpoint and refuses to start when one is over the agent's `max_system_prompt_tokens`. Config
/// validation already refused prompts whose estimate is over; where the API cannot be reached in
/// time, that estimate stands (and a warning says so).
async fn check_system_prompts(cfg: &Config) -> anyhow::Result<()> {
    if cfg.anthropic.api_key.is_none() {
        return Ok(());
    }
    let client = agentfleet::llm::AnthropicClient::new(&cfg.anthropic)?;
    for (name, agent) in cfg.agents.iter().filter(|(_, a)| a.provider == agentfleet::domain::Provider::Anthropic) {
        match tokio::time::timeout(COUNT_TIMEOUT, client.count_tokens(&agent.model, &agent.system_prompt)).await {
            Ok(Ok(tokens)) if tokens > u64::from(agent.max_system_prompt_tokens) => anyhow::bail!(
                "agents.{name}.system_prompt: is {tokens} tokens (counted by the API's count_tokens), over the limit \
                 of {}: shorten it, or allow more with `max_system_prompt_tokens`",
                agent.max_system_prompt_tokens
            ),
            Ok(Ok(tokens)) => tracing::info!(agent = %name, tokens, "system prompt counted"),
            Ok(Err(e)) => {
                tracing::warn!(agent = %name, error = %e, "could not count the system prompt; the estimate stands")
            }
            Err(_) => tracing::warn!(agent = %name, "counting the system prompt timed out; the estimate stands"),
        }
    }
    Ok(())
}

async fn run(cfg: Config, env: &dyn Fn(&str) -> Option<String>) -> anyhow::Result<()> {
    let shutdown = shutdown_token();
    let consuming = Consuming::default();
    let stop_ops = CancellationToken::new();
    // Up before the broker and Redis are: `/healthz` answers while the worker waits for them.
    let ops = match cfg.worker.metrics_listen.as_str() {
        "" => None,
        listen => {
            let addr = listen.parse().map_err(|e| anyhow::anyhow!("worker.metrics_listen: {e}"))?;
            let metrics = telemetry::install_metrics(None).map_err(|e| anyhow::anyhow!("metrics: {e}"))?;
            Some(crate::ops::serve(addr, metrics, consuming.clone(), stop_ops.clone()).await?)
        }
    };
    check_system_prompts(&cfg).await?;
    let ran = Worker::build(cfg, env).await?.reporting(consuming).run(shutdown).await;
    stop_ops.cancel();
    if let Some(ops) = ops {
        let _ = ops.await;
    }
    ran
}
