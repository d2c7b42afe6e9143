//! `agentfleet-model-server`: the scripted Anthropic Messages API stand-in, as a process.
//!
//! Prints `listening on http://ADDR` on stdout once bound (logs go to stderr) and serves until
//! SIGTERM or SIGINT.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;

use agentfleet_tests::model_server::{Faults, ModelServer, ModelServerConfig};
use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

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
        };
        ModelServerConfig { api_key: self.api_key.clone(), faults }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let server = ModelServer::start(listener, args.config()).await?;
    announce(&server.base_url())?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
fn init_tracing() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// The one stdout line scripts wait for.
fn announce(base_url: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {base_url}").context("writing to stdout")?;
    stdout.flush().context("flushing stdout")
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = async {
        if let Err(error) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %error, "cannot listen for SIGINT");
            std::future::pending::<()>().await;
        }
    };
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut stream) => {
                stream.recv().await;
            }
            Err(error) => {
                tracing::error!(error = %error, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    tokio::select! {
        () = interrupt => {}
        () = terminate => {}
    }
}
