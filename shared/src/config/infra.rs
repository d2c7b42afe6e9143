//! Where the fleet connects and how its processes run: RabbitMQ, Redis, the worker and the
//! dispatcher, telemetry and webhooks.

use std::fmt;

use secrecy::SecretString;
use serde::Deserialize;

use super::agents::default_pool;
use super::{Invalid, Problem, check_url};
use crate::domain::Name;

/// Logging, tracing and redaction settings.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// JSON field names whose values never appear in traces or logs (e.g. `card_number`). API
    /// keys and tool header values are always redacted.
    pub redact_fields: Vec<String>,
    /// OpenTelemetry trace export (`[telemetry.otlp]`); off unless an endpoint is set.
    pub otlp: OtlpConfig,
}

/// OpenTelemetry export of spans over OTLP (HTTP, protobuf): one trace per session, with a span
/// per step and a child span per action (the `telemetry::otel` module).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct OtlpConfig {
    /// The collector's OTLP/HTTP base URL, e.g. `http://otel-collector:4318`; `/v1/traces` is
    /// appended unless the URL already ends with it. Empty (the default) turns export off. The
    /// environment variable `OTEL_EXPORTER_OTLP_ENDPOINT` overrides it; extra request headers
    /// (an API key of a hosted backend) come from `OTEL_EXPORTER_OTLP_HEADERS`.
    pub endpoint: String,
    /// The fraction of sessions traced, 0.0 to 1.0. Decided from the session id, so every
    /// worker and the dispatcher agree on a session. Default 1.0.
    pub sample_ratio: f64,
    /// The longest a finished span waits before it is sent, in ms. Default 5000.
    pub batch_delay_ms: u64,
    /// Finished spans held for export; beyond this new spans are dropped, so a slow or absent
    /// collector never slows a step. Default 8192.
    pub max_queue_size: usize,
    /// Timeout of one export request, in ms. Default 10000.
    pub timeout_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            sample_ratio: 1.0,
            batch_delay_ms: 5_000,
            max_queue_size: 8_192,
            timeout_ms: 10_000,
        }
    }
}

impl OtlpConfig {
    /// True when spans are exported.
    pub fn enabled(&self) -> bool {
        !self.endpoint.is_empty()
    }

    /// The URL spans are posted to.
    pub fn traces_url(&self) -> String {
        let base = self.endpoint.trim_end_matches('/');
        if base.ends_with("/v1/traces") { base.to_owned() } else { format!("{base}/v1/traces") }
    }

    pub(super) fn validate(&self) -> Result<(), Invalid> {
        if self.enabled() {
            check_url(&self.endpoint, &["http", "https"]).map_err(|p| Invalid::new("endpoint", p))?;
        }
        if !(0.0..=1.0).contains(&self.sample_ratio) {
            return Err(Invalid::new("sample_ratio", Problem::NotAFraction));
        }
        let counts = [
            ("max_queue_size", self.max_queue_size as u64),
            ("batch_delay_ms", self.batch_delay_ms),
            ("timeout_ms", self.timeout_ms),
        ];
        match counts.iter().find(|(_, v)| *v == 0) {
            Some((field, _)) => Err(Invalid::new(*field, Problem::AtLeast(1))),
            None => Ok(()),
        }
    }
}

/// Signed webhooks: the signing secret and how deliveries are retried.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhooksConfig {
    /// The environment variable holding the signing secret. Default `AGENTFLEET_WEBHOOK_SECRET`.
    pub secret_env: String,
    /// The signing secret, read from `secret_env` (never put it in the file). Without one, events
    /// that have a URL are dead-lettered instead of sent unsigned.
    #[serde(skip)]
    pub secret: Option<SecretString>,
    /// Timeout of one POST. Default 5000 ms.
    pub timeout_ms: u64,
    /// Attempts per event (retries wait 1 s, 5 s, 30 s, 2 min, then 10 min each) before it is
    /// dead-lettered. Default 12.
    pub max_attempts: u32,
    /// Deliver to loopback, private (RFC 1918, fc00::/7), link-local, unspecified and cloud
    /// metadata addresses. Default false: such addresses are refused when a callback is created
    /// and when a delivery connects (names are checked as resolved), and the event is dead-lettered.
    pub allow_private_addresses: bool,
}

impl fmt::Debug for WebhooksConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WebhooksConfig")
            .field("secret_env", &self.secret_env)
            .field("secret", &self.secret.as_ref().map(|_| "[redacted]"))
            .field("timeout_ms", &self.timeout_ms)
            .field("max_attempts", &self.max_attempts)
            .field("allow_private_addresses", &self.allow_private_addresses)
            .finish()
    }
}

impl Default for WebhooksConfig {
    fn default() -> Self {
        Self {
            secret_env: "AGENTFLEET_WEBHOOK_SECRET".into(),
            secret: None,
            timeout_ms: 5_000,
            max_attempts: 12,
            allow_private_addresses: false,
        }
    }
}

/// RabbitMQ settings.
///
/// The limits become queue arguments. RabbitMQ cannot change a queue's arguments: after changing one
/// here, delete the queue it applies to (drained) or use another `prefix`; the processes refuse to
/// start on a queue declared with other arguments, and say which.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AmqpConfig {
    /// Broker URL. Env `AMQP_URL`. Default `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: String,
    /// Prefix of every exchange and queue name. Default `agentfleet`; tests use their own.
    pub prefix: String,
    /// Deliveries of one step message before it is dead-lettered. Default 20.
    pub delivery_limit: u32,
    /// Deliveries of one session request (`<prefix>.requests`) before it is dead-lettered: a request
    /// that makes the intake fail over and over ends in `<prefix>.dead` instead of looping. Default 10.
    pub requests_delivery_limit: u32,
    /// Most requests waiting in `<prefix>.requests`; past it, a publish is refused (nacked), never
    /// dropped. Default 100000.
    pub requests_max_length: u64,
    /// Most bytes of message bodies waiting in `<prefix>.requests`; past it, a publish is refused
    /// (nacked). Default 268435456 (256 MiB).
    pub requests_max_bytes: u64,
    /// Most messages kept in `<prefix>.dead`; past it, new dead letters are refused (a direct
    /// publish is nacked; the broker keeps a dead-lettered message in its source queue until there is
    /// room). Default 100000.
    pub dead_max_length: u64,
    /// Most bytes of message bodies kept in `<prefix>.dead`, likewise. Default 268435456 (256 MiB).
    pub dead_max_bytes: u64,
}

impl Default for AmqpConfig {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            prefix: "agentfleet".into(),
            delivery_limit: 20,
            requests_delivery_limit: 10,
            requests_max_length: 100_000,
            requests_max_bytes: 256 * 1024 * 1024,
            dead_max_length: 100_000,
            dead_max_bytes: 256 * 1024 * 1024,
        }
    }
}

impl AmqpConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let counts = [
            ("requests_max_length", self.requests_max_length),
            ("requests_max_bytes", self.requests_max_bytes),
            ("dead_max_length", self.dead_max_length),
            ("dead_max_bytes", self.dead_max_bytes),
        ];
        match counts.iter().find(|(_, v)| *v == 0) {
            Some((field, _)) => Err(Invalid::new(*field, Problem::AtLeast(1))),
            None => Ok(()),
        }
    }
}

/// Redis settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    /// Redis URL. Env `REDIS_URL`. Default `redis://127.0.0.1:6379`. A Redis Cluster is named by
    /// `redis+cluster://[user:password@]host:port[,host:port…]` (`rediss+cluster://` with TLS), or by
    /// `cluster = true` with this URL as one of its nodes.
    pub url: String,
    /// Talk to a Redis Cluster: `url` and `cluster_nodes` are seed nodes, from which the client
    /// learns the whole cluster and follows its slot moves. Default false.
    pub cluster: bool,
    /// More seed nodes of the cluster besides `url` (`redis://host:port` each, all with the same
    /// scheme), so that the fleet starts while any one seed is down. Needs `cluster`. Default none.
    pub cluster_nodes: Vec<String>,
    /// Prefix of every key. Default `af`; tests use their own.
    pub key_prefix: String,
    /// How long to wait for a reply before the outcome counts as unknown. Default 10000 ms, far
    /// above tail latency under load (see DESIGN §3). On a cluster it bounds the whole command,
    /// redirections and retries included.
    pub response_timeout_ms: u64,
    /// How long to wait for a connection (to each node of a cluster). Default 5000 ms.
    pub connect_timeout_ms: u64,
    /// Refuse to start unless Redis is durable: AOF on (`appendonly yes`) and
    /// `maxmemory-policy noeviction`, read with `CONFIG GET` at start (on every master of a
    /// cluster). Without it a non-durable Redis is only warned about. Where `CONFIG` is refused (a
    /// managed Redis that renames or forbids it) durability cannot be verified, and this refuses
    /// too: check persistence in the provider's settings and leave this off there. Default false.
    pub require_durable: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            cluster: false,
            cluster_nodes: Vec::new(),
            key_prefix: "af".into(),
            response_timeout_ms: 10_000,
            connect_timeout_ms: 5_000,
            require_durable: false,
        }
    }
}

/// The Redis the fleet talks to, as [`RedisConfig`] names it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// One server (or a proxy that looks like one), at this URL.
    Single(String),
    /// A Redis Cluster, found through these seed nodes (`redis://` or `rediss://` URLs).
    Cluster(Vec<String>),
}

/// The schemes of a cluster URL, each with the scheme of its nodes.
const CLUSTER_SCHEMES: [(&str, &str); 2] = [("redis+cluster", "redis"), ("rediss+cluster", "rediss")];

impl RedisConfig {
    /// One server or a cluster, and where. Fails on a URL that is not a Redis URL, on
    /// `cluster_nodes` without `cluster`, and on seed nodes that mix TLS and plain TCP.
    pub fn target(&self) -> Result<RedisTarget, Problem> {
        self.resolve().map_err(|e| e.problem)
    }

    /// Every node URL the config names, as far as it parses (for the secrets to redact).
    pub(super) fn node_urls(&self) -> Vec<String> {
        match self.target() {
            Ok(RedisTarget::Single(url)) => vec![url],
            Ok(RedisTarget::Cluster(nodes)) => nodes,
            Err(_) => std::iter::once(&self.url).chain(&self.cluster_nodes).cloned().collect(),
        }
    }

    pub(super) fn validate(&self) -> Result<(), Invalid> {
        self.resolve().map(drop)
    }

    fn resolve(&self) -> Result<RedisTarget, Invalid> {
        let seeds = match cluster_seeds(&self.url) {
            Some(seeds) => Some(seeds.map_err(|p| Invalid::new("url", p))?),
            None => {
                check_url(&self.url, &["redis", "rediss"]).map_err(|p| Invalid::new("url", p))?;
                self.cluster.then(|| vec![self.url.clone()])
            }
        };
        let Some(mut seeds) = seeds else {
            if !self.cluster_nodes.is_empty() {
                return Err(Invalid::new("cluster_nodes", Problem::ClusterNodesWithoutCluster));
            }
            return Ok(RedisTarget::Single(self.url.clone()));
        };
        for (i, node) in self.cluster_nodes.iter().enumerate() {
            check_url(node, &["redis", "rediss"]).map_err(|p| Invalid::new(format!("cluster_nodes[{i}]"), p))?;
            seeds.push(node.clone());
        }
        let tls = |u: &String| u.starts_with("rediss:");
        if seeds.iter().any(tls) && !seeds.iter().all(tls) {
            return Err(Invalid::new("cluster_nodes", Problem::MixedTls));
        }
        Ok(RedisTarget::Cluster(seeds))
    }
}

/// The seed node URLs of a `redis+cluster://[userinfo@]host:port,host:port[/db][?query]` URL, each
/// with the userinfo, path and query of the whole; `None` for any other scheme.
fn cluster_seeds(url: &str) -> Option<Result<Vec<String>, Problem>> {
    let (scheme, rest) = url.split_once("://")?;
    let (_, node_scheme) = CLUSTER_SCHEMES.iter().find(|(s, _)| scheme.eq_ignore_ascii_case(s))?;
    let bad = || Problem::ClusterUrl(crate::scrub::urls_in(url));
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let (userinfo, hosts) = match authority.rsplit_once('@') {
        Some((userinfo, hosts)) => (format!("{userinfo}@"), hosts),
        None => (String::new(), authority),
    };
    if hosts.split(',').any(str::is_empty) {
        return Some(Err(bad()));
    }
    let nodes = hosts.split(',').map(|host| format!("{node_scheme}://{userinfo}{host}{tail}"));
    Some(nodes.map(|node| check_url(&node, &["redis", "rediss"]).map(|()| node).map_err(|_| bad())).collect())
}

/// What happens to sessions once they have ended (`[sessions]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SessionsConfig {
    /// How long a finished session (completed, failed, budget_exhausted or cancelled) is kept,
    /// counted from its end: then every Redis key of it expires, and the dispatcher's janitor takes
    /// it out of the listing indexes. Sessions still running or waiting for people never expire.
    /// Default 2592000000 ms (30 days).
    pub retention_ms: u64,
}

impl Default for SessionsConfig {
    fn default() -> Self {
        Self { retention_ms: 30 * 86_400_000 }
    }
}

/// The dead-letter store (`[dead_letters]`): the dispatcher moves each message of `<prefix>.dead`
/// into Redis, where `GET /v1/dlq` lists it and `POST /v1/dlq/{id}/redrive` re-publishes it.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DeadLettersConfig {
    /// Move dead letters from the queue into Redis. Off, they stay in `<prefix>.dead` for
    /// RabbitMQ's own tools, and the API shows only what was stored before. Default true.
    pub store: bool,
    /// Most dead letters kept in Redis. When the store is full the dispatcher stops taking them
    /// out of the queue, so the rest wait there (bounded by `amqp.dead_max_*`), never dropped.
    /// Default 10000.
    pub max_stored: u64,
    /// Most bytes of dead-letter bodies kept in Redis, likewise. A body is kept up to
    /// `dispatcher.max_body_bytes`; a longer one is kept cut, and cannot be re-driven. Default
    /// 268435456 (256 MiB).
    pub max_stored_bytes: u64,
}

impl Default for DeadLettersConfig {
    fn default() -> Self {
        Self { store: true, max_stored: 10_000, max_stored_bytes: 256 * 1024 * 1024 }
    }
}

impl DeadLettersConfig {
    pub(super) fn validate(&self) -> Result<(), Invalid> {
        let counts = [("max_stored", self.max_stored), ("max_stored_bytes", self.max_stored_bytes)];
        match counts.iter().find(|(_, v)| *v == 0) {
            Some((field, _)) => Err(Invalid::new(*field, Problem::AtLeast(1))),
            None => Ok(()),
        }
    }
}

/// Worker settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// Steps run at once by one worker (also the AMQP prefetch). Default 64.
    pub concurrency: u16,
    /// The pools this worker consumes. Default `["default"]`.
    pub pools: Vec<Name>,
    /// Lease time-to-live; renewed at a third of it while a step runs. Default 15000 ms.
    pub lease_ms: u64,
    /// How long in-flight steps may take to finish after SIGTERM. Default 25000 ms (under the
    /// pod's default 30 s grace).
    pub shutdown_grace_ms: u64,
    /// Where `/metrics` is served; empty for none. Default `0.0.0.0:9090`.
    pub metrics_listen: String,
    /// Model call attempts per step (retries go through the delay queues) before the session
    /// fails. Default 8.
    pub max_model_attempts: u32,
    /// The longest a worker waits in-process for tool retries, per call. Longer waits go through
    /// the delay queues. Default 2000 ms.
    pub max_inline_retry_ms: u64,
    /// Times a step may be sent through the delay queues for a tool's long retry before the call
    /// counts as failed. Default 5.
    pub max_tool_deferrals: u32,
    /// Tool response bodies are read up to this many bytes and no further; a longer one reaches the
    /// model cut, with a marker saying how long it was. This bounds a worker's memory against a tool
    /// that answers with a huge or endless body. Default 32768 bytes.
    pub max_tool_result_bytes: usize,
    /// Tool inputs longer than this (as JSON) are refused with an error result. Default 262144.
    pub max_tool_input_bytes: usize,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            concurrency: 64,
            pools: vec![default_pool()],
            lease_ms: 15_000,
            shutdown_grace_ms: 25_000,
            metrics_listen: "0.0.0.0:9090".into(),
            max_model_attempts: 8,
            max_inline_retry_ms: 2_000,
            max_tool_deferrals: 5,
            max_tool_result_bytes: 32 * 1024,
            max_tool_input_bytes: 256 * 1024,
        }
    }
}

/// Dispatcher settings.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DispatcherConfig {
    /// Where the HTTP API is served. Default `127.0.0.1:8080` (loopback: put a proxy or a
    /// Service in front to expose it).
    pub listen: String,
    /// Where `/healthz`, `/readyz`, `/metrics` and `/openapi.json` are served, apart from the API
    /// and without authentication. Default `127.0.0.1:9090`.
    pub ops_listen: String,
    /// The longest one API request may take before it is answered 503. Default 30000 ms.
    pub request_timeout_ms: u64,
    /// Largest accepted `input`, in bytes. Default 65536.
    pub max_input_bytes: usize,
    /// Largest accepted request body, in bytes. Default 262144.
    pub max_body_bytes: usize,
    /// How long an `idempotency_key` is remembered. Default 86400 s.
    pub idempotency_ttl_s: u64,
    /// How often the janitor looks for stalled sessions. Default 60 s.
    pub janitor_interval_s: u64,
    /// A queued or running session that has not moved for this long gets its current step
    /// re-published by the janitor. Default 300 s.
    pub stall_after_s: u64,
    /// How long the dispatcher may take to stop after SIGTERM: in-flight HTTP requests, then its
    /// background tasks (intake, webhook deliverer, janitor, gauges). Default 25000 ms (under the
    /// pod's default 30 s grace).
    pub shutdown_grace_ms: u64,
    /// After SIGTERM, how long the API keeps serving with `/readyz` answering 503 before it stops
    /// taking connections: the time a load balancer (a Kubernetes Service's endpoints) needs to
    /// notice and send new requests elsewhere. The pod's grace period must cover this plus
    /// `shutdown_grace_ms`. Default 0 (stop at once).
    pub drain_delay_ms: u64,
}

impl Default for DispatcherConfig {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8080".into(),
            ops_listen: "127.0.0.1:9090".into(),
            request_timeout_ms: 30_000,
            max_input_bytes: 64 * 1024,
            max_body_bytes: 256 * 1024,
            idempotency_ttl_s: 86_400,
            janitor_interval_s: 60,
            stall_after_s: 300,
            shutdown_grace_ms: 25_000,
            drain_delay_ms: 0,
        }
    }
}
