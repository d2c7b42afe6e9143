//! A step's Redis writes do not grow with the conversation (DESIGN §2: append-only messages).
//!
//! The test runs its own `redis-server`, so the server's `total_net_input_bytes` counts exactly what
//! the engine sends, and drives one session step by step through the real engine, store, model
//! client and tools.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfleet::amqp::{PublishError, StepPublisher};
use agentfleet::breaker::Breakers;
use agentfleet::budget::Limits;
use agentfleet::config::Config;
use agentfleet::domain::{Name, SessionId, StepMessage};
use agentfleet::guard::FleetGuard;
use agentfleet::llm::ModelClients;
use agentfleet::ratelimit::RateLimiter;
use agentfleet::step::{Agents, Disposition, Engine, EngineParts, EngineSettings};
use agentfleet::store::{AdminStore, NewSession, RedisStore};
use agentfleet_tests::fleet::{FleetOptions, config_text, eventually};
use agentfleet_tests::model_server::{ModelServer, ModelServerConfig};
use agentfleet_tests::tool_server::{ToolServer, ToolServerConfig};
use async_trait::async_trait;
use tokio::net::TcpListener;

/// Keeps published step messages in memory: this test is about Redis, not the broker.
#[derive(Default)]
struct Recorder(Mutex<Vec<StepMessage>>);

#[async_trait]
impl StepPublisher for Recorder {
    async fn publish_step(&self, _: &Name, msg: &StepMessage, _: Option<Duration>) -> Result<(), PublishError> {
        self.0.lock().map_err(|_| PublishError::Nacked)?.push(msg.clone());
        Ok(())
    }
    async fn dead_letter(&self, _: &[u8], _: &str) -> Result<(), PublishError> {
        Err(PublishError::Nacked)
    }
    async fn publish_event(&self, _: &str, _: &serde_json::Value) -> Result<(), PublishError> {
        Ok(())
    }
}

struct PrivateRedis(Child, u16);

impl PrivateRedis {
    async fn start() -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .spawn()?;
        let me = Self(child, port);
        let what = format!("the private redis-server to answer on port {port}");
        eventually(&what, Duration::from_secs(5), || async { me.conn().await.ok().map(drop) }).await;
        Ok(me)
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.1)
    }

    async fn conn(&self) -> anyhow::Result<redis::aio::MultiplexedConnection> {
        let mut c = redis::Client::open(self.url())?.get_multiplexed_async_connection().await?;
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(c)
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn net_input_bytes(c: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("stats").query_async(c).await?;
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("total_net_input_bytes:"))
        .ok_or_else(|| anyhow::anyhow!("no stat"))?;
    Ok(line.trim().parse()?)
}

/// Round trips the server answered so far: script calls (`EVALSHA`, `EVAL`, `SCRIPT LOAD`). Every
/// write and read of a step is a script; `INFO commandstats` also counts the commands a script runs,
/// which are not round trips.
async fn round_trips(c: &mut redis::aio::MultiplexedConnection) -> anyhow::Result<u64> {
    let info: String = redis::cmd("INFO").arg("commandstats").query_async(c).await?;
    let mut total = 0;
    for line in info.lines() {
        let Some((name, stats)) = line.strip_prefix("cmdstat_").and_then(|l| l.split_once(':')) else { continue };
        if matches!(name, "evalsha" | "eval" | "script|load" | "script") {
            let calls = stats.split(',').find_map(|f| f.strip_prefix("calls=")).unwrap_or("0");
            total += calls.parse::<u64>()?;
        }
    }
    Ok(total)
}

/// One session, step by step, through the real engine, store, model client and tools: a step's
/// writes do not grow with the conversation, and a step is four round trips to Redis (claim, model
/// checkpoint, tool checkpoint, release) once the guard believes its dependencies healthy.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn step_writes_do_not_grow_with_the_conversation() -> anyhow::Result<()> {
    let redis = PrivateRedis::start().await?;
    let model = ModelServer::start(TcpListener::bind("127.0.0.1:0").await?, ModelServerConfig::default()).await?;
    let tools = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
    let opts = FleetOptions { redis_url: redis.url(), ..Default::default() };
    let text = config_text("growth", &opts, &model.base_url(), &tools.base_url());
    let env = |k: &str| (k == "ANTHROPIC_API_KEY").then(|| "test-key".to_owned());
    let cfg = Config::parse(&text, std::path::Path::new("growth.toml"), &env)?;

    let store = Arc::new(RedisStore::connect(&cfg.redis).await?);
    let recorder = Arc::new(Recorder::default());
    let settings = EngineSettings {
        worker_id: "growth".into(),
        lease: Duration::from_secs(120),
        max_model_attempts: 3,
        max_tool_deferrals: 3,
    };
    let engine = Engine::new(EngineParts {
        // Believed healthy for the whole run, so that only the steps' own round trips are counted.
        guard: Arc::new(
            FleetGuard::new(
                Breakers::new(store.connection(), "growth"),
                RateLimiter::new(store.connection(), "growth"),
            )
            .with_cache_ms(600_000),
        ),
        store: store.clone(),
        publisher: recorder.clone(),
        llm: ModelClients::new(&cfg)?,
        agents: Agents::build(&cfg, &env)?,
        settings,
    });

    let id = SessionId::generate();
    let new = NewSession {
        id: id.clone(),
        agent: Name::parse("support")?,
        tenant: None,
        messages: vec![agentfleet::llm::user_message("[steps=45] a long conversation")],
        origin: None,
        metadata: serde_json::json!({}),
        limits: Limits::of(&cfg.agent("support").ok_or_else(|| anyhow::anyhow!("no agent"))?.budget),
        callback_url: None,
        first_call: None,
    };
    store.create(&new, 0).await?;

    let mut inspect = redis.conn().await?;
    let msgs_key = format!("growth:{{{id}}}:msgs");
    let mut written: HashMap<u32, u64> = HashMap::new();
    let mut commands: Vec<u64> = Vec::new();
    for step in 1..=40u32 {
        let before_len: isize = redis::cmd("LLEN").arg(&msgs_key).query_async(&mut inspect).await?;
        let before_trips = round_trips(&mut inspect).await?;
        let before = net_input_bytes(&mut inspect).await?;
        let body = serde_json::to_vec(&StepMessage { session_id: id.clone(), step, attempt: 0 })?;
        assert_eq!(engine.handle(&body, &Name::parse("default")?).await, Disposition::Ack);
        let after = net_input_bytes(&mut inspect).await?;
        commands.push(round_trips(&mut inspect).await? - before_trips);
        let new_msgs: Vec<String> =
            redis::cmd("LRANGE").arg(&msgs_key).arg(before_len).arg(-1).query_async(&mut inspect).await?;
        assert_eq!(new_msgs.len(), 2, "step {step} appends its assistant message and its tool results");
        let own: u64 = new_msgs.iter().map(|m| m.len() as u64).sum();
        written.insert(step, after - before - own);
    }
    let published = recorder.0.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.len();
    assert_eq!(published, 40, "each step published its successor");
    let (w2, w40) = (written[&2], written[&40]);
    println!("bytes written beyond the new messages: step 2 = {w2}, step 40 = {w40}");
    assert!(w40 as f64 <= 1.5 * w2 as f64, "step 40 wrote {w40} bytes beyond its messages, step 2 wrote {w2}");
    // The first step loads the scripts and reserves its call itself (this session was created
    // without the dispatcher's plan), and the guard takes its first look at the breakers and the
    // rate. Now and then a step adds a budget alert or the breakers' batched successes, and a
    // script's first use loads it (up to three round trips).
    println!("Redis round trips per step: {commands:?}");
    let later = &commands[2..];
    let fours = later.iter().filter(|n| **n == 4).count();
    assert!(later.iter().all(|n| *n <= 8), "{commands:?}");
    assert!(fours * 10 >= later.len() * 9, "steps 3..40 are four round trips each: {commands:?}");
    Ok(())
}
