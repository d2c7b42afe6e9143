//! The OpenAI-compatible provider against the scripted OpenAI server, driven the way the step engine
//! drives a provider: each reply stored with `assistant_message()`, each `tool_use` answered with
//! `tool_results_message`, and the whole stored conversation (Anthropic format) sent on every call.
//! The server validates every request, so `invalid_total == 0` proves the translation is right.

use agentfleet::config::OpenAiConfig;
use agentfleet::llm::openai::{INVALID_ARGUMENTS_KEY, invalid_arguments};
use agentfleet::llm::{
    Block, CallSpec, LlmError, ModelReply, OpenAiClient, StopReason, ToolOutcome, ToolUse, tool_results_message,
    user_message,
};
use agentfleet_tests::openai_server::OpenAiServer;
use anyhow::{Context as _, Result, bail, ensure};
use serde_json::value::RawValue;
use tokio::net::TcpListener;

const API_KEY: &str = "sk-local-test";
const SYSTEM: &str = "You are a support agent. Use the tools you are given.";
const TOOLS: &str = r#"[
    {"name": "search_knowledge_base", "description": "Search the knowledge base.",
     "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]}},
    {"name": "escalate_to_human", "description": "Hand over to a human.",
     "input_schema": {"type": "object", "properties": {"reason": {"type": "string"}}}}
]"#;

/// The server with a required key, and a client that sends it.
struct Harness {
    server: OpenAiServer,
    client: OpenAiClient,
    tools: Box<RawValue>,
}

impl Harness {
    async fn start() -> Result<Self> {
        let server = OpenAiServer::start_with_api_key(TcpListener::bind("127.0.0.1:0").await?, API_KEY).await?;
        let config = OpenAiConfig { api_key: Some(API_KEY.to_owned().into()), ..client_config(&server) };
        let client = OpenAiClient::new(&config)?;
        Ok(Self { server, client, tools: RawValue::from_string(TOOLS.to_owned())? })
    }

    fn spec(&self) -> CallSpec<'_> {
        CallSpec {
            model: "qwen3:8b",
            system: SYSTEM,
            max_tokens: 512,
            tools: Some(&self.tools),
            tool_choice: None,
            cache: None,
        }
    }

    /// One model call on the stored conversation; the reply is appended as the engine appends it.
    async fn step(&self, spec: &CallSpec<'_>, messages: &mut Vec<String>) -> Result<ModelReply> {
        let reply = self.client.create_message(spec, &messages[..]).await?;
        messages.push(reply.assistant_message());
        Ok(reply)
    }

    /// Plays the goal until a reply calls no tool; returns every reply and the stored conversation.
    async fn converse(&self, goal: &str) -> Result<(Vec<ModelReply>, Vec<String>)> {
        let mut messages = vec![user_message(goal)];
        let mut replies = Vec::new();
        for _ in 0..10 {
            let reply = self.step(&self.spec(), &mut messages).await?;
            let uses = tool_uses(&reply);
            replies.push(reply);
            if uses.is_empty() {
                return Ok((replies, messages));
            }
            messages.push(tool_results_message(&run_tools(&uses)));
        }
        bail!("the conversation did not end")
    }
}

fn tool_uses(reply: &ModelReply) -> Vec<ToolUse> {
    let uses = reply.blocks().into_iter().filter_map(|block| match block {
        Block::ToolUse(tool_use) => Some(tool_use),
        _ => None,
    });
    uses.collect()
}

/// What the tool runner does: invalid arguments become an error result, the rest succeed.
fn run_tools(uses: &[ToolUse]) -> Vec<(String, ToolOutcome)> {
    let outcome = |tool_use: &ToolUse| match invalid_arguments(&tool_use.input) {
        Some(raw) => ToolOutcome::error(format!("the arguments were not valid JSON: {raw}")),
        None => ToolOutcome::ok(format!("3 articles about {}", tool_use.input["query"])),
    };
    uses.iter().map(|tool_use| (tool_use.id.clone(), outcome(tool_use))).collect()
}

#[tokio::test]
async fn five_step_conversation_validates_end_to_end() -> Result<()> {
    let harness = Harness::start().await?;
    let (replies, messages) = harness.converse("Research our refund policy [steps=5]").await?;

    let stops: Vec<StopReason> = replies.iter().map(|r| r.stop_reason.clone()).collect();
    let mut expected = vec![StopReason::ToolUse; 4];
    expected.push(StopReason::EndTurn);
    assert_eq!(stops, expected, "turns 2 and 4 said finish_reason \"stop\" with a tool call");
    for (k, reply) in replies[..4].iter().enumerate() {
        assert_eq!(reply.text(), format!("Step {} of 5.", k + 1));
        let uses = tool_uses(reply);
        assert_eq!(uses.len(), 1);
        assert_eq!(uses[0].name, "search_knowledge_base");
        assert_eq!(uses[0].input, serde_json::json!({ "query": format!("step {} of 5", k + 1) }));
    }
    assert_eq!(replies[4].text(), "Done after 5 steps.");
    assert_eq!(messages.len(), 10, "goal, then 4 × (assistant, tool results), then the answer");

    let ids: std::collections::HashSet<String> = replies.iter().flat_map(tool_uses).map(|t| t.id).collect();
    assert_eq!(ids.len(), 4, "every call has its own id");
    for reply in &replies {
        assert_eq!(reply.usage.cache_read_input_tokens, (SYSTEM.len() / 4) as u64);
        assert!(reply.usage.input_tokens > 0 && reply.usage.output_tokens > 0, "{:?}", reply.usage);
        assert!(reply.id.starts_with("chatcmpl-"));
    }

    let stats = harness.server.stats();
    assert_eq!(stats.invalid_total, 0, "rejected: {:?}", stats.invalid_reasons);
    assert_eq!((stats.requests_total, stats.valid_total), (5, 5));
    assert_eq!(stats.tool_choice_seen.get("auto"), Some(&5));
    Ok(())
}

#[tokio::test]
async fn invalid_arguments_reach_the_runner_and_the_model() -> Result<()> {
    let harness = Harness::start().await?;
    let (replies, _) = harness.converse("[badargs]").await?;
    ensure!(replies.len() == 2, "expected two turns, got {}", replies.len());

    let first = &replies[0];
    assert_eq!(first.stop_reason, StopReason::ToolUse);
    assert_eq!(first.text(), "", "content: null gives no text block");
    let uses = tool_uses(first);
    let input = &uses.first().context("a tool_use block")?.input;
    assert_eq!(input[INVALID_ARGUMENTS_KEY], "{not json");
    assert_eq!(invalid_arguments(input), Some("{not json"));

    assert_eq!(replies[1].stop_reason, StopReason::EndTurn);
    assert_eq!(replies[1].text(), "Done. Last tool result: Error: the arguments were not valid JSON: {not json");
    let stats = harness.server.stats();
    assert_eq!((stats.invalid_total, stats.valid_total), (0, 2), "{:?}", stats.invalid_reasons);
    Ok(())
}

/// Two tool turns of `[steps=5]`, stored, then the budget nudge.
async fn two_tool_turns_then_nudge(harness: &Harness) -> Result<Vec<String>> {
    let mut messages = vec![user_message("[steps=5]")];
    for _ in 0..2 {
        let reply = harness.step(&harness.spec(), &mut messages).await?;
        messages.push(tool_results_message(&run_tools(&tool_uses(&reply))));
    }
    messages.push(user_message("Budget limit reached. Summarize what you have accomplished so far."));
    Ok(messages)
}

#[tokio::test]
async fn a_summary_call_may_follow_tool_turns() -> Result<()> {
    // The engine's budget summary, either without tools or with tools that may not be called.
    let harness = Harness::start().await?;
    for summary_spec in
        [CallSpec { tools: None, ..harness.spec() }, CallSpec { tool_choice: Some("none"), ..harness.spec() }]
    {
        let mut messages = two_tool_turns_then_nudge(&harness).await?;
        let summary = harness.step(&summary_spec, &mut messages).await?;
        assert_eq!(summary.stop_reason, StopReason::EndTurn);
        assert!(tool_uses(&summary).is_empty());
        assert!(summary.text().contains("cannot continue"), "{}", summary.text());
    }
    let stats = harness.server.stats();
    assert_eq!(stats.invalid_total, 0, "rejected: {:?}", stats.invalid_reasons);
    assert_eq!(stats.tool_choice_seen.get("absent"), Some(&1), "no tool_choice without tools");
    assert_eq!(stats.tool_choice_seen.get("none"), Some(&1));
    assert_eq!(stats.tool_choice_seen.get("auto"), Some(&4));
    Ok(())
}

#[tokio::test]
async fn errors_are_classified() -> Result<()> {
    let harness = Harness::start().await?;

    let wrong_key = OpenAiConfig { api_key: Some("sk-wrong".to_owned().into()), ..client_config(&harness.server) };
    let error = OpenAiClient::new(&wrong_key)?
        .create_message(&harness.spec(), &[user_message("hi")])
        .await
        .expect_err("wrong key");
    assert!(matches!(&error, LlmError::Api { status: 401, kind, .. } if kind == "invalid_request_error"), "{error}");
    assert!(!error.is_retryable());

    let unanswered = [
        user_message("[steps=3]"),
        r#"{"role":"assistant","content":[{"type":"tool_use","id":"toolu_1","name":"search_knowledge_base","input":{}}]}"#.to_owned(),
        user_message("never mind"),
    ];
    let error = harness.client.create_message(&harness.spec(), &unanswered).await.expect_err("unanswered call");
    let LlmError::Api { status, kind, message, .. } = &error else { bail!("not an API error: {error}") };
    assert_eq!((*status, kind.as_str()), (400, "invalid_request_error"));
    assert!(message.contains("did not have response messages: toolu_1"), "{message}");

    let closed = TcpListener::bind("127.0.0.1:0").await?;
    let base_url = format!("http://{}/v1", closed.local_addr()?);
    drop(closed);
    let unreachable = OpenAiClient::new(&OpenAiConfig { base_url, timeout_ms: 5_000, ..OpenAiConfig::default() })?;
    let error = unreachable.create_message(&harness.spec(), &[user_message("hi")]).await.expect_err("closed");
    assert!(matches!(error, LlmError::Transport { .. }) && error.is_retryable(), "{error}");

    let stats = harness.server.stats();
    assert_eq!((stats.requests_total, stats.invalid_total, stats.valid_total), (2, 2, 0));
    Ok(())
}

fn client_config(server: &OpenAiServer) -> OpenAiConfig {
    OpenAiConfig { base_url: server.base_url(), timeout_ms: 10_000, ..OpenAiConfig::default() }
}
