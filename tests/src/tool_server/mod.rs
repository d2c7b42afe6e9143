//! A tool backend for the support agent: `POST /tools/{name}` with the tool input as the body.
//!
//! It answers deterministically, counts every call per tool and per `Idempotency-Key` so tests can
//! tell whether a client repeated a call, and can fail or slow down on purpose, globally or per tool
//! (`POST /admin/behaviour`). Known tools: `search_knowledge_base`, `lookup_customer`,
//! `create_ticket`; `endless_response` (a body that never ends) and `huge_response` (64 MiB, with its
//! `Content-Length`), for the bounded reads; any other name echoes its input back.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use agentfleet_tests::tool_server::{ToolServer, ToolServerConfig};
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let server = ToolServer::start(listener, ToolServerConfig::default()).await?;
//! println!("tools at {}/tools/", server.base_url());
//! # Ok(()) }
//! ```

mod behaviour;
mod handlers;
mod stats;
mod tools;

use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context as _;
use tokio::net::TcpListener;

use crate::serve::Served;

pub use behaviour::{Behaviour, InvalidBehaviour, ToolBehaviour};
pub use stats::ToolStats;

use handlers::AppState;

/// How to run a [`ToolServer`].
#[derive(Debug, Clone, Default)]
pub struct ToolServerConfig {
    /// Failures and latency in force from the start. Default: none.
    pub behaviour: Behaviour,
}

/// A running tool server; dropping it stops the server.
#[derive(Debug)]
pub struct ToolServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<AppState>,
    server: Served,
}

impl ToolServer {
    /// Serves on `listener` in a background task until [`ToolServer::stop`] or drop.
    ///
    /// Fails when the initial behaviour is invalid or the listener has no address.
    pub async fn start(listener: TcpListener, config: ToolServerConfig) -> anyhow::Result<ToolServer> {
        config.behaviour.validate().context("invalid initial behaviour")?;
        let state = Arc::new(AppState::new(config));
        let server = Served::start("tool server", listener, handlers::router(Arc::clone(&state)))?;
        Ok(ToolServer { addr: server.addr, state, server })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> ToolStats {
        self.state.stats.snapshot()
    }

    /// Zeroes the counters and forgets idempotency keys.
    pub fn reset(&self) {
        self.state.reset();
    }

    /// Replaces the behaviour.
    pub fn set_behaviour(&self, behaviour: Behaviour) -> Result<(), InvalidBehaviour> {
        behaviour.validate()?;
        self.state.set_behaviour(behaviour);
        Ok(())
    }

    /// The behaviour in force.
    pub fn behaviour(&self) -> Behaviour {
        self.state.behaviour()
    }

    /// `http://IP:PORT`, with a wildcard bind address replaced by 127.0.0.1.
    pub fn base_url(&self) -> String {
        self.server.base_url()
    }

    /// Stops accepting connections and waits for in-flight calls to finish.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn set_behaviour_validates() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = ToolServer::start(listener, ToolServerConfig::default()).await.expect("start");
        assert!(server.set_behaviour(Behaviour { fail_rate: 1.5, ..Behaviour::default() }).is_err());
        assert!(server.set_behaviour(Behaviour { latency_ms: 5, ..Behaviour::default() }).is_ok());
        assert_eq!(server.behaviour().latency_ms, 5);
        server.stop().await;
    }
}
