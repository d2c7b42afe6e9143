//! `agentfleet-model-server`: the scripted Anthropic Messages API stand-in, as a process.
//!
//! Prints `listening on http://ADDR` on stdout once bound (logs go to stderr) and serves until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;

use agentfleet_tests::model_server::{Faults, ModelServer, ModelServerConfig};
use anyhow::Context as _;
use clap::Parser;

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(name = "agentfleet-model-server", about = "Scripted Anthropic Messages API for tests")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8090")]
    listen: SocketAddr,
    /// The only API key accepted; without it any non-empty key is.
    #[arg(long, env = "MODEL_SERVER_API_KEY")]
    api_key: Option<String>,
    /// Fixed delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Extra random delay up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_jitter_ms: u64,
    /// Probability of answering a valid request with 429.
    #[arg(long, default_value_t = 0.0)]
    rate_429: f64,
    /// Probability of answering a valid request with 529.
    #[arg(long, default_value_t = 0.0)]
    rate_529: f64,
    /// Probability of answering a valid request with 500.
    #[arg(long, default_value_t = 0.0)]
    rate_500: f64,
    /// `retry-after` seconds sent with a 429.
    #[arg(long, default_value_t = 1)]
    retry_after_s: u64,
}

impl Args {
    fn config(&self) -> ModelServerConfig {
        let faults = Faults {
            latency_ms: self.latency_ms,
            latency_jitter_ms: self.latency_jitter_ms,
            rate_429: self.rate_429,
            rate_529: self.rate_529,
            rate_500: self.rate_500,
            retry_after_s: self.retry_after_s,
            cache_misses: false,
        };
        ModelServerConfig { api_key: self.api_key.clone(), faults, record_requests: false }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    agentfleet_tests::process::init_stderr_logging();
    let args = Args::parse();
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let server = ModelServer::start(listener, args.config()).await?;
    agentfleet_tests::process::announce(&server.base_url())?;
    agentfleet::shutdown::shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}
