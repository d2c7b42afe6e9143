//! A scripted stand-in for the Anthropic Messages API.
//!
//! It speaks the API byte for byte and validates requests the way the real one does (auth, version
//! header, message structure, tool definitions, tool-use pairing, thinking signatures), so a client
//! that works against it has been checked, not just fed. It is written independently of our own
//! client types on purpose: shared types would share their bugs.
//!
//! It is stateless: what it answers depends only on the request. The first user message's text picks
//! a script (directives `[steps=N]`, `[steps=N tool=NAME]`, `[stop=REASON]`, `[exotic]`, or the
//! default support flow), and the number of assistant messages already present is the turn index.
//! Faults (latency, 429, 529, 500) can be injected at runtime through [`ModelServer::set_faults`] or
//! `POST /admin/faults`.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use agentfleet_tests::model_server::{ModelServer, ModelServerConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = ModelServer::start(listener, ModelServerConfig::default()).await?;
//! println!("point ANTHROPIC_BASE_URL at {}", server.base_url());
//! # Ok(()) }
//! ```

mod conversation;
mod error;
mod faults;
mod fields;
mod handlers;
mod headers;
mod request;
mod response;
mod script;
mod signature;
mod stats;
mod tools;
mod validate;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::serve::Served;

pub use faults::{Faults, InvalidFaults};
pub use headers::SUPPORTED_VERSIONS;
pub use stats::{GoalBill, Injected, ModelStats};
pub use validate::check_conversation;

use handlers::AppState;

/// How to run a [`ModelServer`].
#[derive(Debug, Clone, Default)]
pub struct ModelServerConfig {
    /// The only key accepted; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    /// Faults in force from the start. Default: none.
    pub faults: Faults,
}

/// A running model server; dropping it stops the server.
#[derive(Debug)]
pub struct ModelServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<AppState>,
    server: Served,
}

impl ModelServer {
    /// Serves on `listener` in a background task until [`ModelServer::stop`] or drop.
    ///
    /// Fails when the initial faults have a rate outside `0..=1` or the listener has no address.
    pub async fn start(listener: TcpListener, config: ModelServerConfig) -> anyhow::Result<ModelServer> {
        config.faults.validate().context("invalid initial faults")?;
        let state = Arc::new(AppState::new(config));
        let server = Served::start("model server", listener, handlers::router(Arc::clone(&state)))?;
        Ok(ModelServer { addr: server.addr, state, server })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ModelStats {
        self.state.stats.snapshot()
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        self.state.reset();
    }

    /// What each goal (the text of the first user message) was billed: with a unique goal per
    /// session, what each session was billed.
    pub fn bills_by_goal(&self) -> BTreeMap<String, GoalBill> {
        self.state.by_goal.snapshot()
    }

    /// Replaces the faults; rates outside `0..=1` are clamped into it.
    pub fn set_faults(&self, faults: Faults) {
        self.state.set_faults(faults.clamped());
    }

    /// The faults in force.
    pub fn faults(&self) -> Faults {
        self.state.faults()
    }

    /// `http://IP:PORT`, with a wildcard bind address replaced by 127.0.0.1.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Stops accepting connections and waits for in-flight requests to finish.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn start_rejects_bad_faults() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let config = ModelServerConfig { faults: Faults { rate_500: 3.0, ..Faults::default() }, ..Default::default() };
        assert!(ModelServer::start(listener, config).await.is_err());
    }

    #[tokio::test]
    async fn set_faults_clamps() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = ModelServer::start(listener, ModelServerConfig::default()).await.expect("start");
        server.set_faults(Faults { rate_429: 7.0, ..Faults::default() });
        assert_eq!(server.faults().rate_429, 1.0);
        server.stop().await;
    }
}
