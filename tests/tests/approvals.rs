//! Approvals fail closed, driven through the real engine over the in-memory store (as in
//! `engine.rs`), with the scripted model and tool servers in this process. No RabbitMQ, no Redis.
//!
//! Covered: a rule whose field is missing holds the call; a refund split into parts is held once
//! their sum passes a `sum(amount)` rule; a call whose tool's breaker is open falls back to a tool
//! that needs approval and is held instead of run.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfleet::amqp::{PublishError, StepPublisher};
use agentfleet::budget::Limits;
use agentfleet::config::Config;
use agentfleet::domain::{Name, SessionId, SessionStatus, StepMessage};
use agentfleet::guard::{Admission, Gate, Guard, Outcome, Pass, WaitFor};
use agentfleet::llm::ModelClients;
use agentfleet::step::{Agents, Disposition, Engine, EngineParts, EngineSettings};
use agentfleet::store::{MemoryStore, NewSession, Snapshot};
use agentfleet_tests::model_server::{ModelServer, ModelServerConfig};
use agentfleet_tests::tool_server::{ToolServer, ToolServerConfig};
use async_trait::async_trait;
use tokio::net::TcpListener;

/// The step messages the engine published; events and dead letters are not looked at here.
#[derive(Default)]
struct Recorder(Mutex<Vec<StepMessage>>);

#[async_trait]
impl StepPublisher for Recorder {
    async fn publish_step(&self, _: &Name, msg: &StepMessage, _: Option<Duration>) -> Result<(), PublishError> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(msg.clone());
        Ok(())
    }
    async fn dead_letter(&self, _: &[u8], _: &str) -> Result<(), PublishError> {
        Ok(())
    }
    async fn publish_event(&self, _: &str, _: &serde_json::Value) -> Result<(), PublishError> {
        Ok(())
    }
}

/// A guard whose breakers of these tools are open; everything else passes.
struct OpenBreakers(&'static [&'static str]);

#[async_trait]
impl Guard for OpenBreakers {
    async fn admit(&self, gate: &Gate<'_>, _: u64) -> Admission {
        let open = self.0.iter().any(|t| gate.breaker == format!("tool:{t}"));
        let wait = Admission::Wait { after: Duration::from_secs(30), why: WaitFor::Breaker };
        if open { wait } else { Admission::Pass(Pass::default()) }
    }
    async fn report(&self, _: &Gate<'_>, _: Pass, _: &Outcome<'_>, _: u64) {}
}

/// The tools and agents: `issue_refund` with a session-sum rule, `order_lookup` with a rule on a
/// field its calls never carry, and `kb` whose fallback `kb_manual` always needs approval.
fn config_text(model: &str, tools: &str) -> String {
    let http = |name: &str| format!(r#"{{ kind = "http", url = "{tools}/tools/{name}", timeout_ms = 5000 }}"#);
    let object = r#"{ type = "object" }"#;
    format!(
        r#"
[anthropic]
base_url = "{model}"

[tenant_defaults]
daily_cap_usd = 1000.0

[tools.issue_refund]
description = "Refund a customer."
input_schema = {{ type = "object", properties = {{ amount = {{ type = "number" }} }}, required = ["amount"] }}
handler = {refund}
approval_rule = "sum(amount) > 100"

[tools.order_lookup]
description = "Look an order up."
input_schema = {object}
handler = {lookup}
approval_rule = "amount > 100"

[tools.kb]
description = "Search the knowledge base."
input_schema = {object}
handler = {kb}
fallback = "kb_manual"

[tools.kb_manual]
description = "Ask a person to search."
input_schema = {object}
handler = {kb_manual}
requires_approval = true

[agents.refunds]
model = "claude-sonnet-4-5"
system_prompt = "You refund."
tools = ["issue_refund"]

[agents.lookups]
model = "claude-sonnet-4-5"
system_prompt = "You look up."
tools = ["order_lookup"]

[agents.searches]
model = "claude-sonnet-4-5"
system_prompt = "You search."
tools = ["kb", "kb_manual"]
"#,
        refund = http("issue_refund"),
        lookup = http("search_knowledge_base"),
        kb = http("search_knowledge_base"),
        kb_manual = http("search_knowledge_base"),
    )
}

struct Rig {
    engine: Engine,
    store: Arc<MemoryStore>,
    sent: Arc<Recorder>,
    model: ModelServer,
    tools: ToolServer,
    cfg: Config,
}

impl Rig {
    async fn start(open: &'static [&'static str]) -> anyhow::Result<Self> {
        let model = ModelServer::start(TcpListener::bind("127.0.0.1:0").await?, ModelServerConfig::default()).await?;
        let tools = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
        let text = config_text(&model.base_url(), &tools.base_url());
        let env = |k: &str| (k == "ANTHROPIC_API_KEY").then(|| "test-key".to_owned());
        let cfg = Config::parse(&text, std::path::Path::new("approvals.toml"), &env)?;
        let store = Arc::new(MemoryStore::new());
        let sent = Arc::new(Recorder::default());
        let settings = EngineSettings {
            worker_id: "unit".into(),
            lease: Duration::from_secs(60),
            max_model_attempts: 1,
            max_tool_deferrals: 3,
        };
        let engine = Engine::new(EngineParts {
            store: store.clone(),
            publisher: sent.clone(),
            llm: ModelClients::new(&cfg)?,
            agents: Agents::build(&cfg, &env)?,
            guard: Arc::new(OpenBreakers(open)),
            settings,
        });
        Ok(Self { engine, store, sent, model, tools, cfg })
    }

    /// Creates a session of `agent` and runs it until it publishes no next step.
    async fn run(&self, agent: &str, goal: &str) -> anyhow::Result<Snapshot> {
        let id = SessionId::generate();
        let budget = &self.cfg.agent(agent).ok_or_else(|| anyhow::anyhow!("no agent {agent}"))?.budget;
        let new = NewSession {
            id: id.clone(),
            agent: Name::parse(agent)?,
            tenant: None,
            input: goal.into(),
            metadata: serde_json::json!({}),
            limits: Limits::of(budget),
            callback_url: None,
        };
        anyhow::ensure!(self.store.create(&new, 1), "the session existed");
        let pool = Name::parse("default")?;
        let mut next = Some(StepMessage { session_id: id.clone(), step: 1, attempt: 0 });
        for _ in 0..20 {
            let Some(msg) = next.take() else { break };
            let handled = self.engine.handle(&serde_json::to_vec(&msg)?, &pool).await;
            anyhow::ensure!(handled == Disposition::Ack, "a step was requeued");
            next = self.sent.0.lock().unwrap_or_else(|e| e.into_inner()).pop();
        }
        self.store.snapshot(&id).ok_or_else(|| anyhow::anyhow!("no session {id}"))
    }

    fn calls(&self, tool: &str) -> u64 {
        self.tools.stats().by_tool.get(tool).copied().unwrap_or(0)
    }

    async fn stop(self) {
        self.model.stop().await;
        self.tools.stop().await;
    }
}

/// The approval request the session waits on.
fn request(s: &Snapshot) -> serde_json::Value {
    s.meta.escalation.as_deref().and_then(|e| serde_json::from_str(e).ok()).unwrap_or_default()
}

#[tokio::test]
async fn a_rule_whose_field_is_missing_holds_the_call() -> anyhow::Result<()> {
    let rig = Rig::start(&[]).await?;
    let s = rig.run("lookups", "[steps=2 tool=order_lookup] look it up").await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingApproval);
    let req = request(&s);
    assert_eq!(req["tool"], "order_lookup", "{req}");
    assert!(req["reason"].as_str().is_some_and(|r| r.contains("amount > 100")), "{req}");
    assert_eq!(rig.tools.stats().calls_total, 0, "nothing ran before approval");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_refund_split_into_parts_is_held_once_the_sum_passes_the_rule() -> anyhow::Result<()> {
    let rig = Rig::start(&[]).await?;
    let s = rig.run("refunds", "[refund=40,50] two small refunds").await?;
    assert_eq!(s.meta.status, SessionStatus::Completed, "40 + 50 = 90 needs no approval");
    assert_eq!(rig.calls("issue_refund"), 2);

    let s = rig.run("refunds", "[refund=60,30,20] three small refunds").await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingApproval, "60 + 30 + 20 = 110 > 100");
    let req = request(&s);
    assert_eq!((req["tool"].as_str(), req["input"]["amount"].as_u64()), (Some("issue_refund"), Some(20)), "{req}");
    assert!(req["reason"].as_str().is_some_and(|r| r.contains("sum(amount) > 100")), "{req}");
    assert_eq!(rig.calls("issue_refund"), 4, "the first two parts ran, the third waits");
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_call_that_falls_back_to_a_tool_needing_approval_waits_instead_of_running() -> anyhow::Result<()> {
    let rig = Rig::start(&["kb"]).await?;
    let s = rig.run("searches", "[steps=2 tool=kb] search").await?;
    assert_eq!(s.meta.status, SessionStatus::AwaitingApproval);
    let req = request(&s);
    assert_eq!(req["tool"], "kb_manual", "the request names the fallback that would run: {req}");
    assert!(req["tool_use_id"].as_str().is_some_and(|id| !id.is_empty()), "{req}");
    assert_eq!(rig.tools.stats().calls_total, 0, "neither the tool nor its fallback ran");
    rig.stop().await;
    Ok(())
}
