//! `agentfleet-tool-server`: the support agent's tool backend, as a process.
//!
//! Prints `listening on http://ADDR` on stdout once bound (logs go to stderr) and serves until
//! SIGTERM or SIGINT.

use std::net::SocketAddr;

use agentfleet_tests::tool_server::{Behaviour, ToolServer, ToolServerConfig};
use anyhow::Context as _;
use clap::Parser;

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
    agentfleet_tests::process::init_stderr_logging();
    let args = Args::parse();
    let listener =
        tokio::net::TcpListener::bind(args.listen).await.with_context(|| format!("binding {}", args.listen))?;
    let server = ToolServer::start(listener, args.config()).await?;
    agentfleet_tests::process::announce(&server.base_url())?;
    agentfleet::shutdown::shutdown_signal().await;
    tracing::info!("shutting down");
    server.stop().await;
    Ok(())
}
