//! `agentfleet-tool-server`: the support agent's tool backend, as a process.
//!
//! Prints `listening on http://ADDR` on stdout once bound (logs go to stderr) and serves until
//! SIGTERM or SIGINT.

use std::io::{IsTerminal as _, Write as _};
use std::net::SocketAddr;

use agentfleet_tests::tool_server::{Behaviour, ToolServer, ToolServerConfig};
use anyhow::Context as _;
use clap::Parser;
use tracing_subscriber::EnvFilter;

/// Command-line flags.
#[derive(Debug, Parser)]
#[command(name = "agentfleet-tool-server", about = "Canned support tools for tests and the demo")]
struct Args {
    /// Address to listen on; port 0 picks a free port.
    #[arg(long, default_value = "127.0.0.1:8091")]
    listen: SocketAddr,
    /// Probability a tool call fails.
    #[arg(long, default_value_t = 0.0)]
    fail_rate: f64,
    /// Status of a failed call.
    #[arg(long, default_value_t = 503)]
    fail_status: u16,
    /// Delay before every answer, in milliseconds.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
}

impl Args {
    fn config(&self) -> ToolServerConfig {
        let behaviour = Behaviour {
            fail_rate: self.fail_rate,
            fail_status: self.fail_status,
            latency_ms: self.latency_ms,
            ..Behaviour::default()
        };
        ToolServerConfig { behaviour }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    init_tracing();
    let args = Args::parse();
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let server = ToolServer::start(listener, args.config()).await?;
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
