//! A scripted stand-in for an OpenAI-compatible chat-completions server (Ollama, vLLM, llama.cpp).
//!
//! Like [`crate::model_server`], it validates requests the way a strict server does, so a client that
//! works against it has been checked, not just fed; and it is written independently of the client in
//! `agentfleet::llm::openai` on purpose: shared types would share their bugs.
//!
//! It is stateless: the first user message's text picks a script and the number of assistant
//! messages already present is the turn index `k`:
//!
//! - `[steps=N]`: while `k < N-1`, "Step {k+1} of {N}." and one `search_knowledge_base` call with
//!   `{"query":"step {k+1} of {N}"}`, whose `finish_reason` is `"tool_calls"` on even turns and
//!   `"stop"` on odd ones (as several local servers report tool calls); then "Done after {N} steps."
//!   with `"stop"`.
//! - `[badargs]`: at `k = 0` a call whose `arguments` is `"{not json"`, with `content: null`; later,
//!   "Done. Last tool result: …" quoting the last `tool` message. It wins over `[steps=N]`.
//! - no directive: "Done." with `"stop"`.
//!
//! With `tool_choice: "none"` no tool is callable, so a script that wanted one ends instead.
//!
//! `POST /v1/chat/completions` validates (see `validate`) and answers 400
//! `{"error":{"message","type":"invalid_request_error","param":null,"code":null}}` on failure;
//! `GET /admin/stats` and `POST /admin/reset` serve the counters.
//!
//! ```no_run
//! # async fn demo() -> anyhow::Result<()> {
//! use agentfleet_tests::openai_server::OpenAiServer;
//! let server = OpenAiServer::start(tokio::net::TcpListener::bind("127.0.0.1:0").await?).await?;
//! println!("point the OpenAI provider's base_url at {}", server.base_url());
//! # Ok(()) }
//! ```

mod error;
mod handlers;
mod script;
mod stats;
mod validate;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;

use crate::serve::Served;

pub use stats::OpenAiStats;

use handlers::AppState;

/// A running OpenAI-compatible server; dropping it stops the server.
#[derive(Debug)]
pub struct OpenAiServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    state: Arc<AppState>,
    server: Served,
}

impl OpenAiServer {
    /// Serves on `listener` in a background task, accepting any `Authorization` header or none.
    pub async fn start(listener: TcpListener) -> anyhow::Result<Self> {
        Self::serve(listener, None)
    }

    /// Like [`OpenAiServer::start`], but every request must carry `Authorization: Bearer <api_key>`.
    pub async fn start_with_api_key(listener: TcpListener, api_key: &str) -> anyhow::Result<Self> {
        Self::serve(listener, Some(api_key.to_owned()))
    }

    fn serve(listener: TcpListener, api_key: Option<String>) -> anyhow::Result<Self> {
        let state = Arc::new(AppState::new(api_key));
        let server = Served::start("openai server", listener, handlers::router(Arc::clone(&state)))?;
        Ok(Self { addr: server.addr, state, server })
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> OpenAiStats {
        self.state.stats.snapshot()
    }

    /// Zeroes the counters.
    pub fn reset_stats(&self) {
        self.state.stats.reset();
    }

    /// `http://IP:PORT/v1`, with a wildcard bind address replaced by 127.0.0.1.
    pub fn base_url(&self) -> String {
        base_url(&self.server)
    }

    /// Stops accepting connections and waits for in-flight requests to finish.
    pub async fn stop(self) {
        self.server.stop().await;
    }
}

/// `http://IP:PORT/v1` for `server`, reachable from this host.
fn base_url(server: &Served) -> String {
    format!("{}/v1", server.base_url())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{Value, json};

    #[tokio::test]
    async fn base_url_ends_in_v1() {
        let server = OpenAiServer::start(TcpListener::bind("127.0.0.1:0").await.expect("bind")).await.expect("start");
        assert_eq!(server.base_url(), format!("http://{}/v1", server.addr));
        server.stop().await;
    }

    async fn post(server: &OpenAiServer, body: &str, key: Option<&str>) -> (u16, Value) {
        let url = format!("{}/chat/completions", server.base_url());
        let mut request = reqwest::Client::new().post(url).header("content-type", "application/json");
        if let Some(key) = key {
            request = request.bearer_auth(key);
        }
        let response = request.body(body.to_owned()).send().await.expect("send");
        (response.status().as_u16(), response.json().await.expect("json body"))
    }

    #[tokio::test]
    async fn answers_and_rejects_over_http() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let server = OpenAiServer::start_with_api_key(listener, "k").await.expect("start");
        let good = json!({"model": "m", "messages": [{"role": "user", "content": "hi [steps=1]"}]}).to_string();
        let (status, body) = post(&server, &good, Some("k")).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["choices"][0]["message"]["content"], "Done after 1 steps.");
        assert_eq!(body["object"], "chat.completion");
        let (status, body) = post(&server, &good, Some("wrong")).await;
        assert_eq!((status, body["error"]["code"].as_str()), (401, Some("invalid_api_key")));
        let (status, body) = post(&server, "{not json", Some("k")).await;
        assert_eq!((status, body["error"]["type"].as_str()), (400, Some("invalid_request_error")));
        let stats = server.stats();
        assert_eq!((stats.requests_total, stats.valid_total, stats.invalid_total), (3, 1, 2));
        assert_eq!(stats.status_counts.get(&400), Some(&1));
        server.reset_stats();
        assert_eq!(server.stats(), OpenAiStats::default());
        server.stop().await;
    }
}
