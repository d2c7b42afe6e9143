//! One step engine over the in-memory store and publisher, with the scripted model and tool
//! servers in this process: the engine's fast tests (no RabbitMQ, no Redis) drive it step by step.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use agentfleet::amqp::{PublishError, StepPublisher};
use agentfleet::budget::Limits;
use agentfleet::config::Config;
use agentfleet::domain::{Name, SessionId, StepMessage};
use agentfleet::guard::Guard;
use agentfleet::llm::ModelClients;
use agentfleet::step::{Agents, Disposition, Engine, EngineParts, EngineSettings};
use agentfleet::store::{MemoryStore, NewSession, Snapshot};
use async_trait::async_trait;
use tokio::net::TcpListener;

use crate::model_server::{ModelServer, ModelServerConfig};
use crate::tool_server::{ToolServer, ToolServerConfig};

/// What the engine sent to the broker.
#[derive(Debug, Default)]
pub struct Sent {
    /// Step messages, with the delay tier's wait when postponed.
    pub steps: Vec<(StepMessage, Option<Duration>)>,
    /// Dead-lettered bodies' reasons.
    pub dead: Vec<String>,
    /// Event kinds.
    pub events: Vec<String>,
}

/// A [`StepPublisher`] that keeps what it is given.
#[derive(Debug, Default)]
pub struct MemoryPublisher(Mutex<Sent>);

impl MemoryPublisher {
    /// What was sent so far.
    pub fn sent(&self) -> MutexGuard<'_, Sent> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[async_trait]
impl StepPublisher for MemoryPublisher {
    async fn publish_step(&self, _: &Name, msg: &StepMessage, delay: Option<Duration>) -> Result<(), PublishError> {
        self.sent().steps.push((msg.clone(), delay));
        Ok(())
    }
    async fn dead_letter(&self, _: &[u8], reason: &str) -> Result<(), PublishError> {
        self.sent().dead.push(reason.to_owned());
        Ok(())
    }
    async fn publish_event(&self, kind: &str, _: &serde_json::Value) -> Result<(), PublishError> {
        self.sent().events.push(kind.to_owned());
        Ok(())
    }
}

/// The engine, its store and publisher, and the servers it calls.
pub struct EngineRig {
    /// The engine.
    pub engine: Engine,
    /// Its session store.
    pub store: Arc<MemoryStore>,
    /// Its publisher.
    pub sent: Arc<MemoryPublisher>,
    /// The scripted model server.
    pub model: ModelServer,
    /// The tool server.
    pub tools: ToolServer,
    /// The config it runs.
    pub cfg: Config,
    /// The pool deliveries come from.
    pub pool: Name,
}

impl EngineRig {
    /// Starts the servers and builds the engine from `config(model_url, tools_url)`, behind `guard`.
    /// One model call per step: a model error is not retried.
    pub async fn start(config: impl FnOnce(&str, &str) -> String, guard: Arc<dyn Guard>) -> anyhow::Result<Self> {
        Self::start_with(config, guard, 1).await
    }

    /// As [`start`](Self::start), with this many model call attempts per step.
    pub async fn start_with(
        config: impl FnOnce(&str, &str) -> String,
        guard: Arc<dyn Guard>,
        max_model_attempts: u32,
    ) -> anyhow::Result<Self> {
        let model = ModelServer::start(TcpListener::bind("127.0.0.1:0").await?, ModelServerConfig::default()).await?;
        let tools = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
        let text = config(&model.base_url(), &tools.base_url());
        let env = |k: &str| (k == "ANTHROPIC_API_KEY").then(|| "test-key".to_owned());
        let cfg = Config::parse(&text, std::path::Path::new("engine.toml"), &env)?;
        let store = Arc::new(MemoryStore::new());
        let sent = Arc::new(MemoryPublisher::default());
        let settings = EngineSettings {
            worker_id: "unit".into(),
            lease: Duration::from_secs(60),
            max_model_attempts,
            max_tool_deferrals: 3,
        };
        let engine = Engine::new(EngineParts {
            store: store.clone(),
            publisher: sent.clone(),
            llm: ModelClients::new(&cfg)?,
            agents: Agents::build(&cfg, &env)?,
            guard,
            settings,
        });
        Ok(Self { engine, store, sent, model, tools, cfg, pool: Name::parse("default")? })
    }

    /// A new session of `agent` with this goal, its `max_steps` lowered when given.
    pub fn session(&self, agent: &str, goal: &str, max_steps: Option<u32>) -> anyhow::Result<SessionId> {
        let id = SessionId::generate();
        let budget = &self.cfg.agent(agent).ok_or_else(|| anyhow::anyhow!("no agent {agent}"))?.budget;
        let mut limits = Limits::of(budget);
        if let Some(n) = max_steps {
            limits.max_steps = n;
        }
        let new = NewSession {
            id: id.clone(),
            agent: Name::parse(agent)?,
            tenant: None,
            messages: vec![agentfleet::llm::user_message(goal)],
            origin: None,
            metadata: serde_json::json!({}),
            limits,
            callback_url: None,
            first_call: None,
        };
        anyhow::ensure!(self.store.create(&new, 1), "the session existed");
        Ok(id)
    }

    /// Delivers step `step` of session `id` once.
    pub async fn deliver(&self, id: &SessionId, step: u32) -> anyhow::Result<Disposition> {
        let body = serde_json::to_vec(&StepMessage { session_id: id.clone(), step, attempt: 0 })?;
        Ok(self.engine.handle(&body, &self.pool).await)
    }

    /// Delivers step 1, then every step the engine publishes, until it publishes none.
    pub async fn run(&self, id: &SessionId) -> anyhow::Result<Snapshot> {
        self.run_from(id, 1).await
    }

    /// Delivers `step`, then every step the engine publishes, until it publishes none; every
    /// delivery must be acked.
    pub async fn run_from(&self, id: &SessionId, step: u32) -> anyhow::Result<Snapshot> {
        self.sent.sent().steps.clear();
        anyhow::ensure!(self.deliver(id, step).await? == Disposition::Ack, "step {step} was requeued");
        for _ in 0..100 {
            let next = self.sent.sent().steps.pop();
            let Some((msg, _)) = next else { return self.snapshot(id) };
            let handled = self.engine.handle(&serde_json::to_vec(&msg)?, &self.pool).await;
            anyhow::ensure!(handled == Disposition::Ack, "step {} was requeued", msg.step);
        }
        anyhow::bail!("the session did not settle in 100 deliveries")
    }

    /// The session's stored state.
    pub fn snapshot(&self, id: &SessionId) -> anyhow::Result<Snapshot> {
        self.store.snapshot(id).ok_or_else(|| anyhow::anyhow!("no session {id}"))
    }

    /// The kinds of the events published so far.
    pub fn events(&self) -> Vec<String> {
        self.sent.sent().events.clone()
    }

    /// The step messages published and not yet taken.
    pub fn published(&self) -> Vec<(StepMessage, Option<Duration>)> {
        self.sent.sent().steps.clone()
    }

    /// Stops the servers.
    pub async fn stop(self) {
        self.model.stop().await;
        self.tools.stop().await;
    }
}
