//! What the test kit's server binaries share: logging to stderr and the one stdout line that
//! scripts wait for. They stop on `agentfleet::shutdown::shutdown_signal`.

use std::io::{IsTerminal as _, Write as _};

use anyhow::Context as _;
use tracing_subscriber::EnvFilter;

/// Logs to stderr, filtered by `RUST_LOG` (default `info`).
pub fn init_stderr_logging() {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
}

/// Prints `listening on <base_url>` on stdout, the line scripts wait for.
pub fn announce(base_url: &str) -> anyhow::Result<()> {
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "listening on {base_url}").context("writing to stdout")?;
    stdout.flush().context("flushing stdout")
}
