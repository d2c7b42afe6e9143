//! The model server and the tool server over real HTTP, driven the way a correct client drives them:
//! assistant content echoed back unchanged, every `tool_use` answered with a `tool_result` built from
//! a real tool-server call keyed by the `tool_use` id.

use std::time::{Duration, Instant};

use agentfleet::config::{AnthropicConfig, HttpVersion};
use agentfleet::llm::{AnthropicClient, CallSpec, StopReason, user_message};
use agentfleet_tests::model_server::{Faults, ModelServer, ModelServerConfig, ModelStats};
use agentfleet_tests::serve::ConnectionStats;
use agentfleet_tests::tool_server::{Behaviour, ToolBehaviour, ToolServer, ToolServerConfig, ToolStats};
use anyhow::{Context as _, Result, ensure};
use reqwest::StatusCode;
use serde_json::{Value, json};
use tokio::net::TcpListener;

const API_KEY: &str = "test-key";

/// Both servers on port 0 and a client.
struct Harness {
    model: ModelServer,
    tools: ToolServer,
    http: reqwest::Client,
}

impl Harness {
    async fn start() -> Result<Self> {
        let model_config =
            ModelServerConfig { api_key: Some(API_KEY.to_owned()), faults: Faults::default(), record_requests: false };
        let model = ModelServer::start(TcpListener::bind("127.0.0.1:0").await?, model_config).await?;
        let tools = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
        Ok(Self { model, tools, http: reqwest::Client::new() })
    }

    /// `POST /v1/messages` with a correct key and version.
    async fn send(&self, messages: &[Value]) -> Result<reqwest::Response> {
        let body = json!({
            "model": "claude-test",
            "max_tokens": 4096,
            "system": [{"type": "text", "text": "You are a support agent.", "cache_control": {"type": "ephemeral"}}],
            "tools": tool_definitions(),
            "tool_choice": {"type": "auto"},
            "metadata": {"user_id": "tests"},
            "messages": messages,
        });
        let request = self.http.post(format!("{}/v1/messages", self.model.base_url())).json(&body);
        let request = request.header("x-api-key", API_KEY).header("anthropic-version", "2023-06-01");
        Ok(request.send().await?)
    }

    /// Plays a whole conversation; returns every response body and the final history.
    async fn converse(&self, goal: &str) -> Result<(Vec<Value>, Vec<Value>)> {
        let mut messages = vec![json!({"role": "user", "content": goal})];
        let mut responses = Vec::new();
        for _ in 0..10 {
            let response = self.send(&messages).await?;
            ensure!(response.status() == StatusCode::OK, "status {}: {}", response.status(), response.text().await?);
            let body: Value = response.json().await?;
            messages.push(json!({"role": "assistant", "content": body["content"].clone()}));
            let calls_tools = body["stop_reason"] == "tool_use";
            responses.push(body);
            if !calls_tools {
                return Ok((responses, messages));
            }
            let results = self.answer_tool_uses(&messages[messages.len() - 1]["content"]).await?;
            messages.push(json!({"role": "user", "content": results}));
        }
        anyhow::bail!("conversation did not end")
    }

    /// A `tool_result` for every `tool_use` in `content`.
    async fn answer_tool_uses(&self, content: &Value) -> Result<Vec<Value>> {
        let mut results = Vec::new();
        for block in content.as_array().context("content is a list")? {
            if block["type"] == "tool_use" {
                results.push(self.call_tool(block).await?);
            }
        }
        Ok(results)
    }

    async fn call_tool(&self, tool_use: &Value) -> Result<Value> {
        let id = tool_use["id"].as_str().context("tool_use id")?;
        let name = tool_use["name"].as_str().context("tool_use name")?;
        let url = format!("{}/tools/{name}", self.tools.base_url());
        let response = self.http.post(url).header("Idempotency-Key", id).json(&tool_use["input"]).send().await?;
        let is_error = !response.status().is_success();
        let text = response.text().await?;
        Ok(json!({"type": "tool_result", "tool_use_id": id, "content": text, "is_error": is_error}))
    }

    async fn model_stats(&self) -> Result<ModelStats> {
        let url = format!("{}/admin/stats", self.model.base_url());
        Ok(self.http.get(url).send().await?.json().await?)
    }

    async fn tool_stats(&self) -> Result<ToolStats> {
        let url = format!("{}/admin/stats", self.tools.base_url());
        Ok(self.http.get(url).send().await?.json().await?)
    }
}

fn tool_definitions() -> Value {
    let tool = |name: &str, required: &[&str]| json!({"name": name, "description": format!("The {name} tool."), "input_schema": {"type": "object", "required": required}});
    json!([
        tool("search_knowledge_base", &["query"]),
        tool("lookup_customer", &["email"]),
        tool("create_ticket", &["customer_email", "subject", "body"]),
        tool("escalate_to_human", &["reason", "summary"]),
    ])
}

/// The `text` blocks of a response, joined.
fn text_of(response: &Value) -> String {
    let blocks = response["content"].as_array().map(Vec::as_slice).unwrap_or_default();
    blocks.iter().filter(|b| b["type"] == "text").filter_map(|b| b["text"].as_str()).collect::<Vec<_>>().join("")
}

/// The names of the tools a conversation called, in order.
fn tools_called(responses: &[Value]) -> Vec<String> {
    let blocks = responses.iter().flat_map(|r| r["content"].as_array().cloned().unwrap_or_default());
    blocks.filter(|b| b["type"] == "tool_use").filter_map(|b| b["name"].as_str().map(str::to_owned)).collect()
}

/// Checks the exact API error shape and returns the message.
async fn api_error(response: reqwest::Response, status: u16, kind: &str) -> Result<String> {
    ensure!(response.status().as_u16() == status, "expected {status}, got {}", response.status());
    ensure!(request_id(&response).starts_with("req_"), "request-id missing");
    let body: Value = response.json().await?;
    let mut keys: Vec<&String> = body.as_object().context("object")?.keys().collect();
    keys.sort();
    ensure!(keys == ["error", "type"] && body["type"] == "error", "bad shape: {body}");
    ensure!(body["error"]["type"] == kind, "bad error type: {body}");
    Ok(body["error"]["message"].as_str().context("message")?.to_owned())
}

fn request_id(response: &reqwest::Response) -> String {
    response.headers().get("request-id").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned()
}

#[tokio::test]
async fn three_step_conversation() -> Result<()> {
    let h = Harness::start().await?;
    let (responses, _) = h.converse("[steps=3] Research the topic.").await?;
    assert_eq!(responses.len(), 3);
    assert_eq!(text_of(&responses[0]), "Step 1 of 3.");
    assert_eq!(text_of(&responses[1]), "Step 2 of 3.");
    assert_eq!(text_of(&responses[2]), "Done after 3 steps.");
    assert_eq!(responses[2]["stop_reason"], "end_turn");
    assert_eq!(tools_called(&responses), ["search_knowledge_base", "search_knowledge_base"]);

    let model = h.model_stats().await?;
    assert_eq!((model.requests_total, model.valid_total, model.invalid_total), (3, 3, 0));
    assert_eq!(model.status_counts.get(&200), Some(&3));
    assert_eq!(model.max_tokens_seen, [4096, 4096, 4096]);
    assert_eq!(model.tool_choice_seen.get("auto"), Some(&3));
    let tools = h.tool_stats().await?;
    assert_eq!((tools.calls_total, tools.missing_key, tools.repeats()), (2, 0, 0));
    assert_eq!(tools.by_key.len(), 2);
    Ok(())
}

#[tokio::test]
async fn response_has_the_api_shape() -> Result<()> {
    let h = Harness::start().await?;
    let response = h.send(&[json!({"role": "user", "content": "[steps=2]"})]).await?;
    assert_eq!(response.status(), StatusCode::OK);
    assert!(request_id(&response).starts_with("req_"));
    assert!(response.headers().contains_key("anthropic-ratelimit-tokens-remaining"));
    assert_eq!(response.headers()["content-type"], "application/json");
    let body: Value = response.json().await?;
    assert!(body["id"].as_str().is_some_and(|id| id.starts_with("msg_")));
    assert_eq!(
        (&body["type"], &body["role"], &body["model"]),
        (&json!("message"), &json!("assistant"), &json!("claude-test"))
    );
    assert_eq!(body["content"][0]["type"], "thinking");
    assert!(body["content"][2]["id"].as_str().is_some_and(|id| id.starts_with("toolu_")));
    assert!(body.as_object().is_some_and(|o| o.contains_key("container")));
    // The cached system prompt is far below the minimum cacheable length: nothing is read or written.
    assert_eq!(
        (&body["usage"]["cache_read_input_tokens"], &body["usage"]["cache_creation_input_tokens"]),
        (&json!(0), &json!(0))
    );
    assert!(body["usage"]["output_tokens"].as_u64().is_some_and(|n| n >= 1));
    Ok(())
}

#[tokio::test]
async fn support_flow_with_escalation() -> Result<()> {
    let h = Harness::start().await?;
    let goal = "I was charged twice, please refund me. My email is jane@example.com.";
    let (responses, history) = h.converse(goal).await?;
    assert_eq!(tools_called(&responses), ["search_knowledge_base", "lookup_customer", "escalate_to_human"]);
    let search_input = &responses[0]["content"][2]["input"];
    assert_eq!((&search_input["category"], &search_input["query"]), (&json!("billing"), &json!(goal)));
    assert_eq!(responses[1]["content"][2]["input"]["email"], "jane@example.com");
    let last = responses.last().context("responses")?;
    let answer = text_of(last);
    assert!(answer.starts_with("Thanks, resolved with the help of a human: {"), "{answer}");
    assert!(answer.contains("The customer asked for a human"), "{answer}");
    assert_eq!(history.len(), 8);
    assert_eq!(h.tool_stats().await?.by_tool.get("escalate_to_human"), Some(&1));
    Ok(())
}

#[tokio::test]
async fn support_flow_without_escalation() -> Result<()> {
    let h = Harness::start().await?;
    let (responses, _) = h.converse("The app crashes on start. I am bob@corp.io").await?;
    assert_eq!(tools_called(&responses), ["search_knowledge_base", "lookup_customer"]);
    let answer = text_of(responses.last().context("responses")?);
    assert!(answer.starts_with("Here is what I found: \"{\"customer\":"), "{answer}");
    Ok(())
}

#[tokio::test]
async fn exotic_blocks_round_trip() -> Result<()> {
    let h = Harness::start().await?;
    let (responses, _) = h.converse("[exotic] [steps=2]").await?;
    assert_eq!(responses.len(), 2);
    let kinds: Vec<&str> =
        responses[0]["content"].as_array().context("content")?.iter().filter_map(|b| b["type"].as_str()).collect();
    assert_eq!(
        kinds,
        ["thinking", "redacted_thinking", "server_tool_use", "web_search_tool_result", "text", "tool_use"]
    );
    assert_eq!(h.model_stats().await?.invalid_total, 0);
    Ok(())
}

#[tokio::test]
async fn missing_tool_result_is_rejected() -> Result<()> {
    let h = Harness::start().await?;
    let first: Value = h.send(&[json!({"role": "user", "content": "[steps=3]"})]).await?.json().await?;
    let messages = [
        json!({"role": "user", "content": "[steps=3]"}),
        json!({"role": "assistant", "content": first["content"]}),
        json!({"role": "user", "content": "please continue"}),
    ];
    let message = api_error(h.send(&messages).await?, 400, "invalid_request_error").await?;
    assert!(message.contains("`tool_use` ids were found without `tool_result` blocks immediately after"), "{message}");
    let stats = h.model_stats().await?;
    assert_eq!((stats.invalid_total, stats.status_counts.get(&400)), (1, Some(&1)));
    assert_eq!(stats.invalid_reasons, [message]);
    Ok(())
}

#[tokio::test]
async fn tampered_thinking_is_rejected() -> Result<()> {
    let h = Harness::start().await?;
    let first: Value = h.send(&[json!({"role": "user", "content": "[steps=3]"})]).await?.json().await?;
    let mut content = first["content"].clone();
    content[0]["thinking"] = json!("I changed my mind.");
    let tool_use_id = content[2]["id"].clone();
    let messages = [
        json!({"role": "user", "content": "[steps=3]"}),
        json!({"role": "assistant", "content": content}),
        json!({"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": "ok"}]}),
    ];
    let message = api_error(h.send(&messages).await?, 400, "invalid_request_error").await?;
    assert_eq!(message, "messages.1.content.0: Invalid `signature` in `thinking` block");
    Ok(())
}

#[tokio::test]
async fn authentication_styles() -> Result<()> {
    let h = Harness::start().await?;
    let url = format!("{}/v1/messages", h.model.base_url());
    let body = json!({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]});
    let bearer = h.http.post(&url).bearer_auth(API_KEY).header("anthropic-version", "2026-10-21").json(&body);
    assert_eq!(bearer.send().await?.status(), StatusCode::OK);
    let missing = h.http.post(&url).header("anthropic-version", "2023-06-01").json(&body).send().await?;
    assert_eq!(api_error(missing, 401, "authentication_error").await?, "x-api-key header is required");
    let wrong = h.http.post(&url).header("x-api-key", "other").header("anthropic-version", "2023-06-01").json(&body);
    assert_eq!(api_error(wrong.send().await?, 401, "authentication_error").await?, "invalid x-api-key");
    let no_version = h.http.post(&url).header("x-api-key", API_KEY).json(&body).send().await?;
    api_error(no_version, 400, "invalid_request_error").await?;
    let not_json = h.http.post(&url).header("x-api-key", API_KEY).header("anthropic-version", "2023-06-01").body("{");
    api_error(not_json.send().await?, 400, "invalid_request_error").await?;
    Ok(())
}

#[tokio::test]
async fn unknown_routes_use_the_error_shape() -> Result<()> {
    let h = Harness::start().await?;
    let missing = h.http.get(format!("{}/v1/models", h.model.base_url())).send().await?;
    api_error(missing, 404, "not_found_error").await?;
    let wrong_method = h.http.get(format!("{}/v1/messages", h.model.base_url())).send().await?;
    api_error(wrong_method, 405, "invalid_request_error").await?;
    Ok(())
}

#[tokio::test]
async fn injected_429_carries_retry_after() -> Result<()> {
    let h = Harness::start().await?;
    let faults = json!({"rate_429": 1.0, "retry_after_s": 7});
    let set = h.http.post(format!("{}/admin/faults", h.model.base_url())).json(&faults).send().await?;
    assert_eq!(set.status(), StatusCode::OK);
    let response = h.send(&[json!({"role": "user", "content": "hi"})]).await?;
    assert_eq!(response.headers().get("retry-after").and_then(|v| v.to_str().ok()), Some("7"));
    api_error(response, 429, "rate_limit_error").await?;

    h.model.set_faults(Faults { rate_529: 1.0, ..Faults::default() });
    api_error(h.send(&[json!({"role": "user", "content": "hi"})]).await?, 529, "overloaded_error").await?;
    h.model.set_faults(Faults::default());
    assert_eq!(h.send(&[json!({"role": "user", "content": "hi"})]).await?.status(), StatusCode::OK);

    let stats = h.model.stats();
    assert_eq!((stats.injected.r429, stats.injected.r529, stats.valid_total), (1, 1, 3));
    assert_eq!(stats.status_counts.get(&429), Some(&1));
    let reset = h.http.post(format!("{}/admin/reset", h.model.base_url())).send().await?;
    assert!(reset.status().is_success());
    let after = h.model.stats();
    assert!(after.connections.accepted >= 1, "a reset leaves the connections: {:?}", after.connections);
    assert_eq!(ModelStats { connections: ConnectionStats::default(), ..after }, ModelStats::default());
    let bad = h.http.post(format!("{}/admin/faults", h.model.base_url())).json(&json!({"rate_500": 2})).send().await?;
    api_error(bad, 400, "invalid_request_error").await?;
    Ok(())
}

#[tokio::test]
async fn tool_server_counts_keys_and_injects_failures() -> Result<()> {
    let h = Harness::start().await?;
    let url = |tool: &str| format!("{}/tools/{tool}", h.tools.base_url());
    let ticket =
        json!({"customer_email": "a@b.co", "subject": "s", "body": "b", "priority": "high", "category": "billing"});
    let first: Value =
        h.http.post(url("create_ticket")).header("Idempotency-Key", "k1").json(&ticket).send().await?.json().await?;
    let again: Value =
        h.http.post(url("create_ticket")).header("Idempotency-Key", "k1").json(&ticket).send().await?.json().await?;
    assert_eq!(first, again);
    assert!(first["ticket_id"].as_str().is_some_and(|id| id.starts_with("T-")));

    let bad = h.http.post(url("search_knowledge_base")).json(&json!({"category": "billing"})).send().await?;
    assert_eq!(bad.status(), StatusCode::BAD_REQUEST);
    assert_eq!(bad.json::<Value>().await?, json!({"error": "query: field is required"}));

    let behaviour = Behaviour {
        tools: [("lookup_customer".to_owned(), ToolBehaviour { fail_rate: 1.0, ..ToolBehaviour::default() })].into(),
        ..Behaviour::default()
    };
    let set = h.http.post(format!("{}/admin/behaviour", h.tools.base_url())).json(&behaviour).send().await?;
    assert_eq!(set.status(), StatusCode::OK);
    let failed = h
        .http
        .post(url("lookup_customer"))
        .header("Idempotency-Key", "k2")
        .json(&json!({"email": "a@b.co"}))
        .send()
        .await?;
    assert_eq!(failed.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(failed.json::<Value>().await?, json!({"error": "injected failure"}));
    let echoed: Value =
        h.http.post(url("escalate_to_human")).json(&json!({"reason": "r"})).send().await?.json().await?;
    assert_eq!(echoed, json!({"ok": true, "tool": "escalate_to_human", "input": {"reason": "r"}}));

    let stats = h.tool_stats().await?;
    assert_eq!(stats.calls_total, 5);
    assert_eq!((stats.repeats(), stats.missing_key, stats.failures_injected), (1, 2, 1));
    assert_eq!(stats.by_tool.get("create_ticket"), Some(&2));
    let reset = h.http.post(format!("{}/admin/reset", h.tools.base_url())).send().await?;
    assert!(reset.status().is_success());
    assert_eq!(h.tools.stats(), ToolStats::default());
    Ok(())
}

/// The fleet's own model client over HTTP/2 without TLS (`http = "http2"`, as the test fleet runs):
/// calls in flight at once share a few connections, as streams, and none waits for another.
#[tokio::test]
async fn calls_in_flight_share_a_few_http2_connections() -> Result<()> {
    const CALLS: usize = 500;
    const LATENCY: Duration = Duration::from_millis(1_000);
    let faults = Faults { latency_ms: LATENCY.as_millis() as u64, ..Faults::default() };
    let config = ModelServerConfig { api_key: Some(API_KEY.to_owned()), faults, record_requests: false };
    let model = ModelServer::start(TcpListener::bind("127.0.0.1:0").await?, config).await?;
    let cfg = AnthropicConfig {
        base_url: model.base_url(),
        api_key: Some(API_KEY.to_owned().into()),
        http: HttpVersion::Http2,
        ..AnthropicConfig::default()
    };
    let client = AnthropicClient::with_capacity(&cfg, CALLS)?;
    let spec = CallSpec {
        model: "claude-test",
        system: "Be brief.",
        max_tokens: 256,
        tools: None,
        tool_choice: None,
        cache: None,
    };
    let conversation = [user_message("[steps=1] hello")];
    let started = Instant::now();
    let replies = futures::future::join_all((0..CALLS).map(|_| client.create_message(&spec, &conversation))).await;
    let took = started.elapsed();
    for reply in replies {
        ensure!(reply?.stop_reason == StopReason::EndTurn);
    }
    let stats = model.stats();
    ensure!(stats.answered_total == CALLS as u64 && stats.invalid_total == 0, "{:?}", stats.invalid_reasons);
    let connections = stats.connections;
    ensure!((1..=5).contains(&connections.accepted), "{CALLS} calls over {connections:?}");
    ensure!(connections.open == connections.accepted, "the connections stay open for the next calls");
    ensure!(took < LATENCY * 8, "{CALLS} calls of {LATENCY:?} each took {took:?}: they did not run at once");
    Ok(())
}

/// The tool server speaks HTTP/2 without TLS as well as HTTP/1.1.
#[tokio::test]
async fn the_tool_server_speaks_http2_without_tls() -> Result<()> {
    let tools = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
    let h2 = reqwest::Client::builder().http2_prior_knowledge().build()?;
    let url = format!("{}/tools/search_knowledge_base", tools.base_url());
    let response = h2.post(url).header("Idempotency-Key", "k").json(&json!({"query": "refund"})).send().await?;
    ensure!(response.version() == reqwest::Version::HTTP_2, "{:?}", response.version());
    ensure!(response.status() == StatusCode::OK, "{}", response.status());
    ensure!(tools.stats().calls_total == 1);
    Ok(())
}
