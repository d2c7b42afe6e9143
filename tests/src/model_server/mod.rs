//! A scripted stand-in for the Anthropic Messages API.
//!
//! It speaks the API byte for byte and validates requests the way the real one does (auth, version
//! header, message structure, tool definitions, tool-use pairing, thinking signatures), so a client
//! that works against it has been checked, not just fed. It is written independently of our own
//! client types on purpose: shared types would share their bugs.
//!
//! Its one state is the prompt cache: the content it answers depends only on the request, but the
//! usage depends on earlier requests too, as the real API's does. The first user message's text picks
//! a script (directives `[steps=N]`, `[steps=N tool=NAME]`, `[stop=REASON]`, `[exotic]`, or the
//! default support flow), and the number of assistant messages already present is the turn index.
//!
//! Usage: a request's whole input is `T = ceil(body bytes / 4)` tokens. Blocks carrying
//! `cache_control` are breakpoints (at most 4; TTL 5m by default or `"ttl": "1h"`, never a 1h after a
//! 5m). A successful answer reads the longest live cached prefix found at a breakpoint or up to 20
//! blocks before one (`cache_read_input_tokens`), then writes every later breakpoint whose prefix
//! reaches the model's minimum cacheable length (`cache_creation_input_tokens`, the tokens past the
//! read, split by TTL in `cache_creation`); `input_tokens` is the rest of `T`. Without any
//! `cache_control` nothing is read or written. How prefixes are hashed and counted is in the `cache`
//! module; [`strip_cache_control`] helps tests compare prefixes, and with
//! [`ModelServerConfig::record_requests`] each goal's requests are kept for [`ModelServer::recorded`].
//!
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

mod cache;
mod conversation;
mod error;
mod faults;
mod fields;
mod handlers;
mod headers;
mod recorded;
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

use crate::serve::{Connections, Served};

pub use cache::strip_cache_control;
pub use faults::{Faults, InvalidFaults};
pub use headers::SUPPORTED_VERSIONS;
pub use recorded::{CacheUsage, RecordedRequest};
pub use stats::{CacheStats, GoalBill, Injected, ModelStats};
pub use validate::check_conversation;

use handlers::AppState;

/// How to run a [`ModelServer`].
#[derive(Debug, Clone, Default)]
pub struct ModelServerConfig {
    /// The only key accepted; `None` accepts any non-empty key.
    pub api_key: Option<String>,
    /// Faults in force from the start. Default: none.
    pub faults: Faults,
    /// Keep each goal's answered requests (body and usage) for [`ModelServer::recorded`]: the last
    /// 64 of each of at most 1000 goals. Default: false.
    pub record_requests: bool,
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
        let connections = Arc::new(Connections::default());
        let state = Arc::new(AppState::new(config, Arc::clone(&connections)));
        let router = handlers::router(Arc::clone(&state));
        let server = Served::start_counting("model server", listener, router, connections)?;
        Ok(ModelServer { addr: server.addr, state, server })
    }

    /// A snapshot of the counters, with the connections as they are now.
    pub fn stats(&self) -> ModelStats {
        self.state.stats()
    }

    /// Zeroes the counters and empties the prompt cache and the request log.
    pub fn reset_stats(&self) {
        self.state.reset();
    }

    /// What each goal (the text of the first user message) was billed: with a unique goal per
    /// session, what each session was billed.
    pub fn bills_by_goal(&self) -> BTreeMap<String, GoalBill> {
        self.state.by_goal.snapshot()
    }

    /// The answered requests of `goal` (the text of the first user message, as in
    /// [`ModelServer::bills_by_goal`]), oldest first, with the usage each was answered with. Empty
    /// unless [`ModelServerConfig::record_requests`] is set. Requests rejected by validation or
    /// answered with an injected fault are not kept.
    pub fn recorded(&self, goal: &str) -> Vec<RecordedRequest> {
        self.state.log.of(goal)
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
    async fn answers_read_and_write_the_cache_and_are_recorded() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let config = ModelServerConfig { record_requests: true, ..Default::default() };
        let server = ModelServer::start(listener, config).await.expect("start");
        let system = "You are a careful support agent. ".repeat(200);
        let body = serde_json::json!({
            "model": "claude-sonnet-4-5", "max_tokens": 100,
            "system": [{"type": "text", "text": system, "cache_control": {"type": "ephemeral"}}],
            "messages": [{"role": "user", "content": "[steps=1] cache me"}],
        });
        let client = reqwest::Client::new();
        let mut usages = Vec::new();
        for _ in 0..2 {
            let response = client
                .post(format!("{}/v1/messages", server.base_url()))
                .header("x-api-key", "k")
                .header("anthropic-version", "2023-06-01")
                .json(&body)
                .send()
                .await
                .expect("send");
            assert_eq!(response.status(), 200);
            let answer: serde_json::Value = response.json().await.expect("json");
            usages.push(answer["usage"].clone());
        }
        let (first, second) = (&usages[0], &usages[1]);
        let written = first["cache_creation_input_tokens"].as_u64().expect("creation");
        assert!(written > 1024, "{first}");
        assert_eq!(first["cache_creation"]["ephemeral_5m_input_tokens"], written);
        assert_eq!(
            (second["cache_read_input_tokens"].as_u64(), second["cache_creation_input_tokens"].as_u64()),
            (Some(written), Some(0))
        );
        let recorded = server.recorded("[steps=1] cache me");
        assert_eq!(recorded.len(), 2);
        assert_eq!(recorded[1].usage.cache_read_input_tokens, written);
        let total = recorded[1].body.len().div_ceil(4) as u64;
        assert_eq!(recorded[1].usage.input_tokens, total - written);
        assert_eq!(strip_cache_control(&recorded[0].body).expect("json")["system"][0]["text"], system);
        let stats = server.stats();
        let expected = CacheStats {
            requests_with_breakpoints: 2,
            reads: 1,
            writes: 1,
            read_tokens: written,
            creation_tokens: written,
            entries: 1,
        };
        assert_eq!(stats.cache, expected);
        assert_eq!((stats.billed_cache_read_tokens, stats.billed_cache_creation_tokens), (written, written));
        let bill = server.bills_by_goal()["[steps=1] cache me"];
        assert_eq!((bill.cache_read_tokens, bill.cache_creation_tokens), (written, written));
        server.reset_stats();
        assert_eq!(server.stats().cache, CacheStats::default());
        assert!(server.recorded("[steps=1] cache me").is_empty());
        server.stop().await;
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
