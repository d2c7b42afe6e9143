//! `TestFleet`: a whole fleet against the real RabbitMQ and Redis, isolated per test.
//!
//! Each fleet gets its own AMQP name prefix and Redis key prefix, an in-process scripted model server
//! and tool server on port 0, an in-process dispatcher on port 0, and worker *processes* (the real
//! worker CLI) that tests can SIGKILL and restart. `AMQP_URL` and `REDIS_URL` pick the services;
//! `REDIS_URL=redis+cluster://127.0.0.1:7101,…` runs the fleets on a Redis Cluster
//! (`scripts/redis-cluster.sh` starts one).

use std::future::Future;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agentfleet::config::{Config, RedisConfig};
use agentfleet::domain::SessionId;
use agentfleet::redis_conn::RedisConn;
use agentfleet_dispatcher::Dispatcher;
use anyhow::{Context, bail};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::model_server::{ModelServer, ModelServerConfig};
use crate::tool_server::{ToolServer, ToolServerConfig};

/// The broker URL for tests.
pub fn amqp_url() -> String {
    std::env::var("AMQP_URL").unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The Redis URL for tests: one server, or a cluster (`redis+cluster://host:port,…`).
pub fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection to the Redis (one server or a cluster) at `url`, as the fleet's processes make it.
pub async fn redis_at(url: &str) -> anyhow::Result<RedisConn> {
    Ok(RedisConn::connect(&RedisConfig { url: url.to_owned(), ..Default::default() }).await?)
}

/// Deletes every key that starts with `prefix:`, on every master of a cluster.
pub async fn delete_keys_under(conn: &RedisConn, prefix: &str) -> anyhow::Result<()> {
    let mut conn = conn.clone();
    // KEYS goes to every master of a cluster; a DEL of keys of many slots is split by slot.
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}:*")).query_async(&mut conn).await?;
    for chunk in keys.chunks(500) {
        let _: i64 = redis::cmd("DEL").arg(chunk).query_async(&mut conn).await?;
    }
    Ok(())
}

/// How to build a fleet.
#[derive(Debug, Clone)]
pub struct FleetOptions {
    /// Worker processes to start.
    pub workers: usize,
    /// Steps in flight per worker.
    pub concurrency: u16,
    /// Lease TTL of the workers.
    pub lease_ms: u64,
    /// The workers' drain deadline after SIGTERM (`worker.shutdown_grace_ms`). Default 10000.
    pub shutdown_grace_ms: u64,
    /// `max_steps` of every agent.
    pub max_steps: u32,
    /// The Redis URL (a private server for some tests).
    pub redis_url: String,
    /// The broker URL (a private node for the chaos suite, which restarts it).
    pub amqp_url: String,
    /// More TOML appended to the config (agents, tenants).
    pub extra_config: String,
    /// More `key = value` lines for the `[worker]` table.
    pub worker_config: String,
    /// More `key = value` lines for the `[dispatcher]` table.
    pub dispatcher_config: String,
    /// More `key = value` lines for the `[amqp]` table (e.g. `delivery_limit = 1`).
    pub amqp_config: String,
    /// More `key = value` lines for the `[dead_letters]` table. Tests that read `<prefix>.dead`
    /// with `basic_get` set `store = false`, so the dispatcher leaves the dead letters there.
    pub dead_letters_config: String,
    /// The environment the in-process dispatcher reads its config with (e.g. the webhook signing
    /// secret); nothing else of the process environment reaches it.
    pub env: Vec<(String, String)>,
    /// API tokens besides the harness's admin token ([`ADMIN_TOKEN`]); each one's secret is
    /// [`token_secret`] of its name.
    pub tokens: Vec<TestToken>,
    /// The `[tenant_defaults]` table's lines. Default: a daily cap of 1000 USD and 100000 live
    /// sessions.
    pub tenant_defaults: String,
    /// `[auth.amqp_users]`: RabbitMQ users and their tenants (default: `guest` publishes for `acme`).
    pub amqp_users: Vec<(String, String)>,
    /// The model clients' `http` setting (`[anthropic]`, and `[openai]` in a [`TestFleet`]). Default
    /// `http2`: the scripted servers speak HTTP/2 without TLS, so many calls in flight share a few
    /// connections, as they do with the real API. `http1` for a stand-in that speaks only HTTP/1.1.
    pub model_http: String,
    /// A model server to use instead of the fleet's own (whose handle, [`TestFleet::model`], then
    /// sees no traffic): the benchmark runs every fleet against the same server processes.
    pub model_url: Option<String>,
    /// A tool server to use instead of the fleet's own ([`TestFleet::tools`]).
    pub tool_url: Option<String>,
    /// Whether the fleet's own model server keeps the request bodies it answers
    /// ([`ModelServer::recorded`]). Default off: a benchmark would keep thousands.
    pub record_model_requests: bool,
    /// The `support` agent's system prompt.
    pub system_prompt: String,
    /// More `key = value` lines for `[agents.support]` (e.g. `prompt_cache = "off"`).
    pub agent_config: String,
}

/// An API token of a test fleet.
#[derive(Debug, Clone)]
pub struct TestToken {
    /// Its name (and, through [`token_secret`], its secret).
    pub name: String,
    /// Its tenant.
    pub tenant: String,
    /// Its roles: `submit`, `read`, `operate`, `approve`, `admin`.
    pub roles: Vec<String>,
    /// Its `sessions_per_minute`, if not the default.
    pub per_minute: Option<u32>,
}

impl TestToken {
    /// A token `name` of `tenant` with `roles`.
    pub fn new(name: &str, tenant: &str, roles: &[&str]) -> Self {
        let roles = roles.iter().map(|r| (*r).to_owned()).collect();
        Self { name: name.to_owned(), tenant: tenant.to_owned(), roles, per_minute: None }
    }
}

/// The harness's admin token, of tenant `harness`: `fleet.http` sends it.
pub const ADMIN_TOKEN: &str = "aft-test-admin-secret";

/// The secret of the test token named `name`.
pub fn token_secret(name: &str) -> String {
    format!("aft-test-{name}-secret")
}

fn sha256_hex(secret: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(secret.as_bytes()))
}

/// The `[[auth.tokens]]` of a test fleet: the admin token and `tokens`.
fn tokens_toml(tokens: &[TestToken]) -> String {
    let mut out = format!(
        "[[auth.tokens]]\nname = \"harness-admin\"\ntenant = \"harness\"\nroles = [\"admin\"]\nsha256 = \"{}\"\nsessions_per_minute = 1000000\n",
        sha256_hex(ADMIN_TOKEN)
    );
    for t in tokens {
        let roles: Vec<String> = t.roles.iter().map(|r| format!("\"{r}\"")).collect();
        out += &format!(
            "\n[[auth.tokens]]\nname = \"{}\"\ntenant = \"{}\"\nroles = [{}]\nsha256 = \"{}\"\n",
            t.name,
            t.tenant,
            roles.join(", "),
            sha256_hex(&token_secret(&t.name))
        );
        if let Some(n) = t.per_minute {
            out += &format!("sessions_per_minute = {n}\n");
        }
    }
    out
}

/// An HTTP client that sends `Authorization: Bearer <secret>` with every request.
pub fn client_with_token(secret: &str) -> reqwest::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Ok(v) = reqwest::header::HeaderValue::from_str(&format!("Bearer {secret}")) {
        headers.insert(reqwest::header::AUTHORIZATION, v);
    }
    reqwest::Client::builder().default_headers(headers).build().unwrap_or_default()
}

impl Default for FleetOptions {
    fn default() -> Self {
        Self {
            workers: 1,
            concurrency: 16,
            lease_ms: 3_000,
            shutdown_grace_ms: 10_000,
            max_steps: 50,
            redis_url: redis_url(),
            amqp_url: amqp_url(),
            extra_config: String::new(),
            worker_config: String::new(),
            dispatcher_config: String::new(),
            amqp_config: String::new(),
            dead_letters_config: String::new(),
            env: Vec::new(),
            tokens: Vec::new(),
            tenant_defaults: "daily_cap_usd = 1000.0\nmax_live_sessions = 100000".into(),
            amqp_users: vec![("guest".into(), "acme".into())],
            model_http: "http2".into(),
            model_url: None,
            tool_url: None,
            record_model_requests: false,
            system_prompt: "You are a support agent.".into(),
            agent_config: String::new(),
        }
    }
}

/// A running fleet.
pub struct TestFleet {
    /// Prefix of every queue, exchange and key of this fleet.
    pub prefix: String,
    /// The config file every process reads.
    pub config_path: PathBuf,
    /// The parsed config.
    pub config: Config,
    /// The scripted model (idle when [`FleetOptions::model_url`] names another).
    pub model: ModelServer,
    /// The tool server (idle when [`FleetOptions::tool_url`] names another).
    pub tools: ToolServer,
    /// The scripted OpenAI-compatible server (agent `local`).
    pub openai: crate::openai_server::OpenAiServer,
    /// The dispatcher's API base URL.
    pub api: String,
    /// The base URL of the dispatcher's operations endpoints (`/healthz`, `/readyz`, `/metrics`,
    /// `/openapi.json`).
    pub ops: String,
    /// An HTTP client that sends the admin token ([`ADMIN_TOKEN`]).
    pub http: reqwest::Client,
    dir: PathBuf,
    dispatcher_stop: CancellationToken,
    workers: Vec<Option<Child>>,
    metrics_ports: Vec<u16>,
    spawned: usize,
}

impl TestFleet {
    /// Starts the servers, the dispatcher and `opts.workers` worker processes.
    pub async fn start(opts: FleetOptions) -> anyhow::Result<Self> {
        let prefix = format!("t{}", ulid::Ulid::new().to_string().to_lowercase());
        let dir = std::env::temp_dir().join("agentfleet-tests").join(&prefix);
        std::fs::create_dir_all(&dir)?;
        let model_config = ModelServerConfig { record_requests: opts.record_model_requests, ..Default::default() };
        let model = ModelServer::start(TcpListener::bind("127.0.0.1:0").await?, model_config).await?;
        let tools = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
        let openai = crate::openai_server::OpenAiServer::start(TcpListener::bind("127.0.0.1:0").await?).await?;
        let openai_table = format!("[openai]\nbase_url = \"{}\"\nhttp = \"{}\"\n", openai.base_url(), opts.model_http);
        let extra = format!("{}\n{openai_table}{LOCAL_AGENT}", opts.extra_config);
        let opts = FleetOptions { extra_config: extra, ..opts };
        let model_url = opts.model_url.clone().unwrap_or_else(|| model.base_url());
        let tool_url = opts.tool_url.clone().unwrap_or_else(|| tools.base_url());
        let config_text = config_text(&prefix, &opts, &model_url, &tool_url);
        let config_path = dir.join("agentfleet.toml");
        std::fs::write(&config_path, &config_text)?;
        let env = opts.env.clone();
        let lookup = move |k: &str| env.iter().find(|(name, _)| name == k).map(|(_, v)| v.clone());
        let config = Config::load(&config_path, &lookup)?;
        let (api, ops, dispatcher_stop) = start_dispatcher(config.clone()).await?;
        let mut fleet = Self {
            prefix,
            config_path,
            config,
            model,
            tools,
            openai,
            api,
            ops,
            http: client_with_token(ADMIN_TOKEN),
            dir,
            dispatcher_stop,
            workers: Vec::new(),
            metrics_ports: Vec::new(),
            spawned: 0,
        };
        for _ in 0..opts.workers {
            fleet.spawn_worker()?;
        }
        Ok(fleet)
    }

    /// Starts one more worker process; returns its index.
    pub fn spawn_worker(&mut self) -> anyhow::Result<usize> {
        self.spawn_worker_with_env(&[])
    }

    /// Starts one more worker process with extra environment (e.g. `AGENTFLEET_FAILPOINT`).
    pub fn spawn_worker_with_env(&mut self, env: &[(&str, &str)]) -> anyhow::Result<usize> {
        let log = std::fs::File::create(self.dir.join(format!("worker-{}.log", self.spawned)))?;
        let metrics_port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let child = Command::new(worker_binary()?)
            .arg("--metrics-listen")
            .arg(format!("127.0.0.1:{metrics_port}"))
            .arg("--config")
            .arg(&self.config_path)
            .env("ANTHROPIC_API_KEY", "test-key")
            .env("RUST_LOG", "warn")
            .env("HOSTNAME", format!("{}-w{}", self.prefix, self.spawned))
            // The fleet's services, whatever the test process's environment says (a test on a
            // private Redis or broker, while REDIS_URL names a cluster).
            .env("REDIS_URL", &self.config.redis.url)
            .env("AMQP_URL", &self.config.amqp.url)
            .envs(env.iter().copied())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning agentfleet-test-worker")?;
        self.spawned += 1;
        self.workers.push(Some(child));
        self.metrics_ports.push(metrics_port);
        Ok(self.workers.len() - 1)
    }

    /// The `/metrics` URL of worker `i`.
    pub fn worker_metrics_url(&self, i: usize) -> Option<String> {
        self.metrics_ports.get(i).map(|p| format!("http://127.0.0.1:{p}/metrics"))
    }

    /// Process ids of the worker processes still running.
    pub fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().flatten().map(Child::id).collect()
    }

    /// The process id of worker `i`, while it runs.
    pub fn worker_pid(&self, i: usize) -> Option<u32> {
        self.workers.get(i).and_then(Option::as_ref).map(Child::id)
    }

    /// Indexes of the worker processes still running.
    pub fn live_workers(&self) -> Vec<usize> {
        (0..self.workers.len()).filter(|i| self.workers[*i].is_some()).collect()
    }

    /// SIGKILLs worker `i`: no drain, no goodbye, like a node failure.
    pub fn kill_worker(&mut self, i: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.workers.get_mut(i).and_then(Option::take) {
            child.kill()?;
            child.wait()?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for worker `i` to exit by itself; returns its exit status.
    pub async fn wait_exit(&mut self, i: usize, timeout: Duration) -> anyhow::Result<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let Some(child) = self.workers.get_mut(i).and_then(Option::as_mut) else {
                bail!("worker {i} is not running")
            };
            if let Some(status) = child.try_wait()? {
                self.workers[i] = None;
                return Ok(status);
            }
            anyhow::ensure!(Instant::now() < deadline, "worker {i} did not exit within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGTERMs worker `i` without waiting: it drains; [`Self::wait_exit`] waits for the end.
    pub fn terminate_worker(&self, i: usize) -> anyhow::Result<()> {
        let Some(pid) = self.worker_pid(i) else { bail!("worker {i} is not running") };
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
        Ok(())
    }

    /// The URL of `path` (`/healthz`, `/readyz`, `/metrics`) on worker `i`'s operations listener.
    pub fn worker_ops_url(&self, i: usize, path: &str) -> Option<String> {
        self.metrics_ports.get(i).map(|p| format!("http://127.0.0.1:{p}{path}"))
    }

    /// Stops the in-process dispatcher as SIGTERM would (`Dispatcher::run`'s shutdown token).
    pub fn terminate_dispatcher(&self) {
        self.dispatcher_stop.cancel();
    }

    /// Starts another dispatcher on this fleet's config (as a second replica); its API base URL and
    /// the token that stops it.
    pub async fn another_dispatcher(&self) -> anyhow::Result<(String, CancellationToken)> {
        let (api, _ops, stop) = start_dispatcher(self.config.clone()).await?;
        Ok((api, stop))
    }

    /// SIGTERMs worker `i` and waits for it to exit; returns its exit status.
    pub fn stop_worker(&mut self, i: usize) -> anyhow::Result<std::process::ExitStatus> {
        let Some(mut child) = self.workers.get_mut(i).and_then(Option::take) else {
            bail!("worker {i} is not running")
        };
        let pid = nix::unistd::Pid::from_raw(child.id() as i32);
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM)?;
        Ok(child.wait()?)
    }

    /// An HTTP client for the test token named `name` (one of [`FleetOptions::tokens`]).
    pub fn client(&self, name: &str) -> reqwest::Client {
        client_with_token(&token_secret(name))
    }

    /// Waits up to `timeout` until the dispatcher's `/readyz` answers 2xx.
    pub async fn wait_ready(&self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            let ready = self.http.get(format!("{}/readyz", self.ops)).send().await;
            if ready.is_ok_and(|r| r.status().is_success()) {
                return Ok(());
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        bail!("the dispatcher was not ready within {timeout:?}")
    }

    /// Creates a session through the HTTP API.
    pub async fn submit(&self, agent: &str, input: &str) -> anyhow::Result<SessionId> {
        self.submit_json(&serde_json::json!({ "agent": agent, "input": input })).await
    }

    /// Creates a session from a whole request body.
    pub async fn submit_json(&self, body: &Value) -> anyhow::Result<SessionId> {
        let r = self.http.post(format!("{}/v1/sessions", self.api)).json(body).send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if status != reqwest::StatusCode::ACCEPTED {
            bail!("POST /v1/sessions answered {status}: {v}");
        }
        let id = v["id"].as_str().context("no id")?;
        Ok(SessionId::parse(id)?)
    }

    /// `GET /v1/sessions/{id}/trace`: the session's records and their summary.
    pub async fn trace(&self, id: &SessionId) -> anyhow::Result<Value> {
        self.get_json(&format!("/v1/sessions/{id}/trace")).await
    }

    /// `GET /v1/sessions/{id}`.
    pub async fn session(&self, id: &SessionId) -> anyhow::Result<Value> {
        self.get_json(&format!("/v1/sessions/{id}")).await
    }

    /// `GET path` of the API as JSON; an error naming the status unless it is 2xx.
    async fn get_json(&self, path: &str) -> anyhow::Result<Value> {
        let r = self.http.get(format!("{}{path}", self.api)).send().await?;
        let status = r.status();
        let v: Value = r.json().await?;
        if !status.is_success() {
            bail!("GET {path} answered {status}: {v}");
        }
        Ok(v)
    }

    /// Waits until every session is settled (terminal or awaiting a human), up to `timeout`.
    pub async fn wait_settled(&self, ids: &[SessionId], timeout: Duration) -> anyhow::Result<Vec<Value>> {
        let deadline = Instant::now() + timeout;
        let mut settled: Vec<Option<Value>> = vec![None; ids.len()];
        loop {
            for (i, id) in ids.iter().enumerate() {
                if settled[i].is_none() {
                    let v = self.session(id).await?;
                    if is_settled(&v) {
                        settled[i] = Some(v);
                    }
                }
            }
            let left = settled.iter().filter(|s| s.is_none()).count();
            if left == 0 {
                return Ok(settled.into_iter().flatten().collect());
            }
            if Instant::now() > deadline {
                let stuck: Vec<String> = ids
                    .iter()
                    .zip(&settled)
                    .filter(|(_, s)| s.is_none())
                    .map(|(id, _)| id.to_string())
                    .take(5)
                    .collect();
                bail!("{left} sessions not settled after {timeout:?}, e.g. {stuck:?}; logs in {}", self.dir.display());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// A Redis connection for inspection: to the one server or the cluster the fleet uses.
    pub async fn redis(&self) -> anyhow::Result<RedisConn> {
        Ok(RedisConn::connect(&self.config.redis).await?)
    }

    /// An AMQP channel for inspection and raw publishing.
    pub async fn amqp(&self) -> anyhow::Result<(lapin::Connection, lapin::Channel)> {
        let conn = agentfleet::amqp::connect(&self.config.amqp.url, "test-inspector").await?;
        let ch = conn.create_channel().await?;
        Ok((conn, ch))
    }

    /// A janitor over this fleet's Redis and RabbitMQ that counts a live session as stalled once it
    /// has not moved for `stall_after_s`, for tests to sweep by hand.
    pub async fn janitor(&self, stall_after_s: u64) -> anyhow::Result<agentfleet_dispatcher::Janitor> {
        let mut cfg = self.config.clone();
        cfg.dispatcher.stall_after_s = stall_after_s;
        let store =
            agentfleet::store::RedisStore::connect(&cfg.redis).await?.with_retention_ms(cfg.sessions.retention_ms);
        let topology = agentfleet::amqp::Topology::from_config(&cfg.amqp);
        let publisher =
            agentfleet::amqp::AmqpPublisher::connect(&cfg.amqp.url, "test-janitor", topology, vec![]).await?;
        let (store, publisher, cfg) =
            (std::sync::Arc::new(store), std::sync::Arc::new(publisher), std::sync::Arc::new(cfg));
        Ok(agentfleet_dispatcher::Janitor::new(store, publisher, cfg))
    }

    /// Counter `name` with label `label` (`key="value"`), summed over the live worker processes'
    /// `/metrics`.
    pub async fn worker_counter(&self, name: &str, label: &str) -> anyhow::Result<u64> {
        let mut total = 0;
        for i in self.live_workers() {
            let url = self.worker_metrics_url(i).context("no metrics port")?;
            let response = match self.http.get(&url).send().await {
                // A worker still starting has counted nothing yet; callers poll until the sum is in.
                Err(e) if e.is_connect() => continue,
                other => other?,
            };
            total += prometheus_counter(&response.error_for_status()?.text().await?, name, label);
        }
        Ok(total)
    }

    /// Waits until session `id` has status `status` (up to 30 s) and returns it.
    pub async fn wait_status(&self, id: &SessionId, status: &str) -> anyhow::Result<Value> {
        let what = format!("session {id} to reach status {status}");
        try_eventually(&what, Duration::from_secs(30), || async move {
            let s = self.session(id).await?;
            Ok((s["status"] == status).then_some(s))
        })
        .await
    }

    /// Where this fleet's logs are.
    pub fn log_dir(&self) -> &PathBuf {
        &self.dir
    }

    /// Stops everything and deletes this fleet's queues, exchanges and keys.
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        for i in 0..self.workers.len() {
            self.kill_worker(i)?;
        }
        self.dispatcher_stop.cancel();
        self.delete_amqp().await?;
        self.delete_keys().await
    }

    /// The queues that hold work until it is done: the requests queue, every pool's step queue and
    /// every delay queue. A fleet at rest has them empty.
    pub fn work_queues(&self) -> Vec<String> {
        let t = agentfleet::amqp::Topology::new(&self.config.amqp.prefix, 1);
        let mut queues = vec![t.requests_queue()];
        queues.extend(self.config.worker.pools.iter().map(|p| t.step_queue(p)));
        queues.extend(agentfleet::amqp::DELAY_TIERS.iter().map(|(tier, _)| t.delay(tier)));
        queues
    }

    /// The dead-letter queue.
    pub fn dead_letter_queue(&self) -> String {
        agentfleet::amqp::Topology::new(&self.config.amqp.prefix, 1).dead()
    }

    async fn delete_amqp(&self) -> anyhow::Result<()> {
        delete_fleet_amqp(&self.config.amqp.url, &self.config.amqp.prefix, &self.config.worker.pools).await
    }

    async fn delete_keys(&self) -> anyhow::Result<()> {
        delete_keys_under(&self.redis().await?, &self.config.redis.key_prefix).await
    }
}

impl Drop for TestFleet {
    fn drop(&mut self) {
        for child in self.workers.iter_mut().filter_map(Option::take) {
            let mut child = child;
            let _ = child.kill();
            let _ = child.wait();
        }
        self.dispatcher_stop.cancel();
    }
}

/// Deletes the queues and exchanges of the fleet named `prefix` (with `pools`) on the broker at
/// `amqp_url`: what a test fleet, or a fleet a test started as processes, declared.
pub async fn delete_fleet_amqp(amqp_url: &str, prefix: &str, pools: &[agentfleet::domain::Name]) -> anyhow::Result<()> {
    use agentfleet::amqp::DELAY_TIERS;
    use agentfleet::webhooks;
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    let conn = agentfleet::amqp::connect(amqp_url, "test-cleanup").await?;
    let ch = conn.create_channel().await?;
    let t = agentfleet::amqp::Topology::new(prefix, 1);
    let mut queues = vec![t.dead(), t.requests_queue()];
    queues.extend(pools.iter().map(|p| t.step_queue(p)));
    queues.extend(DELAY_TIERS.iter().map(|(tier, _)| t.delay(tier)));
    queues.push(webhooks::queue(prefix));
    queues.extend(webhooks::RETRY_TIERS.iter().map(|(tier, _)| webhooks::retry_queue(prefix, tier)));
    for q in &queues {
        let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
    }
    let mut exchanges = vec![t.steps_exchange(), t.events_exchange(), t.dead()];
    exchanges.extend(DELAY_TIERS.iter().map(|(tier, _)| t.delay(tier)));
    for e in &exchanges {
        let _ = ch.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default()).await;
    }
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

/// An agent on the OpenAI-compatible scripted server.
const LOCAL_AGENT: &str = r#"
[prices."local-model"]
input = 0.0
output = 0.0

[agents.local]
model = "local-model"
provider = "openai"
system_prompt = "You are a local model."
tools = ["search_knowledge_base", "lookup_customer"]
"#;

/// The worker binary built beside this one: `target/<profile>/agentfleet-test-worker`, next to a
/// binary of this package or one folder above a test binary (`target/<profile>/deps/`).
fn worker_binary() -> anyhow::Result<PathBuf> {
    test_binary("agentfleet-test-worker")
}

/// The CLI built beside the test binaries (`target/<profile>/agentfleet-test-cli`).
pub fn cli_binary() -> anyhow::Result<PathBuf> {
    test_binary("agentfleet-test-cli")
}

/// One finished run of the CLI binary ([`cli_binary`]).
#[derive(Debug)]
pub struct CliRun {
    /// Its exit code (none when a signal ended it).
    pub code: Option<i32>,
    /// What it printed on stdout.
    pub stdout: String,
    /// What it printed on stderr.
    pub stderr: String,
}

impl CliRun {
    /// The run, if it exited 0.
    pub fn ok(self) -> anyhow::Result<Self> {
        anyhow::ensure!(self.code == Some(0), "the CLI failed: {self:?}");
        Ok(self)
    }

    /// Stdout as the JSON document `--json` promises.
    pub fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_str(&self.stdout).with_context(|| format!("stdout is not one JSON document: {self:?}"))
    }
}

/// A binary of this crate, built beside the test binaries by `cargo test -p agentfleet-tests`.
pub fn test_binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("this binary has no folder")?;
    let candidates = [dir.join(name), dir.parent().unwrap_or(dir).join(name)];
    match candidates.iter().find(|c| c.exists()) {
        Some(bin) => Ok(bin.clone()),
        None => bail!(
            "{} is missing: build it with `cargo test -p agentfleet-tests` or `cargo build -p agentfleet-tests --bins`",
            candidates[1].display()
        ),
    }
}

/// How often [`eventually`] and [`try_eventually`] look again.
pub const POLL_EVERY: Duration = Duration::from_millis(25);

/// Polls `check` every [`POLL_EVERY`] until it yields `Some`, and returns that value.
///
/// Panics naming `what` (the awaited state, e.g. "session s_… to be cancelled") when `deadline`
/// passes first. Tests wait on state with this, never on a fixed sleep.
pub async fn eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// [`eventually`] for a fallible check: an error of `check` is returned at once; a timeout panics
/// naming `what`.
pub async fn try_eventually<T, F, Fut>(what: &str, deadline: Duration, mut check: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let started = Instant::now();
    loop {
        if let Some(value) = check().await.with_context(|| format!("while waiting for {what}"))? {
            return Ok(value);
        }
        assert!(started.elapsed() < deadline, "timed out after {deadline:?} waiting for {what}");
        tokio::time::sleep(POLL_EVERY).await;
    }
}

/// The number of ready messages in `queue` (a passive declare; unacknowledged ones are not counted).
pub async fn queue_depth(ch: &lapin::Channel, queue: &str) -> anyhow::Result<u32> {
    let opts = lapin::options::QueueDeclareOptions { passive: true, ..Default::default() };
    let q = ch.queue_declare(queue.into(), opts, lapin::types::FieldTable::default()).await?;
    Ok(q.message_count())
}

/// The value of counter `name` with label `label` (`key="value"`) in a Prometheus text exposition,
/// summed over every series that carries that label; 0 when there is none.
pub fn prometheus_counter(text: &str, name: &str, label: &str) -> u64 {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| line.split_once(' '))
        .filter(|(series, _)| {
            series.split_once('{').is_some_and(|(metric, labels)| metric == name && labels.contains(label))
        })
        .filter_map(|(_, value)| value.trim().parse::<f64>().ok())
        .map(|v| v as u64)
        .sum()
}

/// True when a session will not move without outside help.
pub fn is_settled(v: &Value) -> bool {
    matches!(
        v["status"].as_str(),
        Some(
            "completed"
                | "failed"
                | "budget_exhausted"
                | "cancelled"
                | "awaiting_human"
                | "awaiting_approval"
                | "paused"
        )
    )
}

/// The test process's Prometheus recorder, installed once and shared by every in-process dispatcher.
pub fn metrics_handle() -> metrics_exporter_prometheus::PrometheusHandle {
    static HANDLE: std::sync::OnceLock<metrics_exporter_prometheus::PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE
        .get_or_init(|| {
            agentfleet::telemetry::install_metrics(None).unwrap_or_else(|_| {
                // Another recorder is installed already: render from a fresh, unregistered one.
                metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder().handle()
            })
        })
        .clone()
}

async fn start_dispatcher(config: Config) -> anyhow::Result<(String, String, CancellationToken)> {
    let api = TcpListener::bind("127.0.0.1:0").await?;
    let ops = TcpListener::bind("127.0.0.1:0").await?;
    let (addr, ops_addr) = (api.local_addr()?, ops.local_addr()?);
    let listeners = agentfleet_dispatcher::Listeners { api, ops };
    let dispatcher = Dispatcher::build(config, Some(listeners), Some(metrics_handle())).await?;
    let stop = CancellationToken::new();
    let token = stop.clone();
    tokio::spawn(async move {
        if let Err(e) = dispatcher.run(token).await {
            tracing::error!(error = %e, "test dispatcher failed");
        }
    });
    Ok((format!("http://{addr}"), format!("http://{ops_addr}"), stop))
}

/// The config file of a test fleet: its prefixes, the servers' URLs and one `support` agent.
pub fn config_text(prefix: &str, o: &FleetOptions, model_url: &str, tools_url: &str) -> String {
    format!(
        r#"
[amqp]
url = "{amqp}"
prefix = "{prefix}"
{amqp_extra}

[dead_letters]
{dead_letters_extra}

[redis]
url = "{redis}"
key_prefix = "{prefix}"

[anthropic]
base_url = "{model_url}"
http = "{model_http}"

[worker]
concurrency = {concurrency}
lease_ms = {lease_ms}
metrics_listen = ""
shutdown_grace_ms = {shutdown_grace_ms}
{worker_extra}

[dispatcher]
listen = "127.0.0.1:0"
ops_listen = "127.0.0.1:0"
janitor_interval_s = 1
{dispatcher_extra}

{tokens}
[tenant_defaults]
{tenant_defaults}
[auth.amqp_users]
{amqp_users}

[tools.search_knowledge_base]
description = "Use this FIRST before answering any question."
input_schema = {{ type = "object", properties = {{ query = {{ type = "string" }}, category = {{ type = "string", enum = ["billing", "technical", "account", "product"] }} }}, required = ["query"] }}
handler = {{ kind = "http", url = "{tools_url}/tools/search_knowledge_base", timeout_ms = 5000 }}

[tools.lookup_customer]
description = "Use this to identify the customer."
input_schema = {{ type = "object", properties = {{ email = {{ type = "string" }} }}, required = ["email"] }}
handler = {{ kind = "http", url = "{tools_url}/tools/lookup_customer", timeout_ms = 5000 }}

[tools.escalate_to_human]
description = "Use this when the customer asks for a human or a refund."
input_schema = {{ type = "object", properties = {{ reason = {{ type = "string" }}, summary = {{ type = "string" }}, suggested_team = {{ type = "string" }} }}, required = ["reason", "summary"] }}
handler = {{ kind = "builtin" }}

[tools.issue_refund]
description = "Use this to refund a customer."
input_schema = {{ type = "object", properties = {{ customer_email = {{ type = "string" }}, amount = {{ type = "number" }}, reason = {{ type = "string" }} }}, required = ["customer_email", "amount", "reason"] }}
handler = {{ kind = "http", url = "{tools_url}/tools/issue_refund", timeout_ms = 5000 }}
approval_rule = "amount > 100"

[agents.support]
model = "claude-sonnet-4-5"
system_prompt = {system_prompt}
tools = ["search_knowledge_base", "lookup_customer", "escalate_to_human", "issue_refund"]
budget = {{ max_steps = {max_steps} }}
{agent_extra}

{extra}
"#,
        amqp = o.amqp_url,
        redis = o.redis_url,
        concurrency = o.concurrency,
        lease_ms = o.lease_ms,
        shutdown_grace_ms = o.shutdown_grace_ms,
        max_steps = o.max_steps,
        extra = o.extra_config,
        amqp_users = o.amqp_users.iter().map(|(u, t)| format!("{u:?} = {t:?}\n")).collect::<String>(),
        worker_extra = o.worker_config,
        dispatcher_extra = o.dispatcher_config,
        amqp_extra = o.amqp_config,
        dead_letters_extra = o.dead_letters_config,
        tokens = tokens_toml(&o.tokens),
        tenant_defaults = o.tenant_defaults,
        model_http = o.model_http,
        system_prompt = serde_json::Value::from(o.system_prompt.as_str()),
        agent_extra = o.agent_config,
    )
}

/// Checks that a finished `[steps=n]` conversation has every step once, in order.
pub fn check_step_conversation(v: &Value, n: usize) -> Result<(), String> {
    let msgs = v["messages"].as_array().ok_or("no messages")?;
    if msgs.len() != 2 * n {
        return Err(format!("{} messages, expected {}", msgs.len(), 2 * n));
    }
    for (i, m) in msgs.iter().enumerate() {
        let role = if i % 2 == 0 { "user" } else { "assistant" };
        if m["role"] != role {
            return Err(format!("message {i} has role {}, expected {role}", m["role"]));
        }
    }
    for k in 1..=n {
        let text = assistant_text(&msgs[2 * k - 1]);
        let expected = if k < n { format!("Step {k} of {n}.") } else { format!("Done after {n} steps.") };
        if !text.contains(&expected) {
            return Err(format!("assistant message {k} says {text:?}, expected {expected:?}"));
        }
        if k < n {
            let results = msgs[2 * k]["content"]
                .as_array()
                .map_or(0, |c| c.iter().filter(|b| b["type"] == "tool_result").count());
            if results != 1 {
                return Err(format!("user message after step {k} has {results} tool results"));
            }
        }
    }
    Ok(())
}

fn assistant_text(m: &Value) -> String {
    m["content"]
        .as_array()
        .map(|blocks| {
            blocks
                .iter()
                .filter(|b| b["type"] == "text")
                .filter_map(|b| b["text"].as_str())
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_default()
}
