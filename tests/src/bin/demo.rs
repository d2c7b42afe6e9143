//! `agentfleet-demo`: drives a running fleet through its HTTP API, the way a business system would.
//!
//! It submits `--count` customer-support goals (cycling through a built-in list), then polls each
//! session until it ends or pauses for people, printing a line per outcome, a table, and totals by
//! outcome. A pause for people (`awaiting_human`, or `awaiting_approval` of a tool call) counts as a
//! good outcome: handing a refund or an angry customer to a person is what the agent is told to do.
//! The exit code is 0 only when every session completed or was handed to people.
//!
//! It uses nothing but the public API, so it also shows what a client needs: an idempotency key per
//! request (a retried submission never creates a second session) and polling of `GET /v1/sessions/{id}`.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use agentfleet_tests::demo_goals::{GOALS, Goal};
use anyhow::{Context as _, bail};
use clap::Parser;
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

/// Submits support goals to an agentfleet dispatcher and reports how each session ended.
#[derive(Debug, Parser)]
#[command(name = "agentfleet-demo", about)]
struct Args {
    /// The dispatcher's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    url: String,
    /// The dispatcher's operations base URL (`/healthz`).
    #[arg(long, default_value = "http://127.0.0.1:9090")]
    ops_url: String,
    /// The API token (sent as `Authorization: Bearer`).
    #[arg(long, env = "AGENTFLEET_TOKEN", hide_env_values = true)]
    token: String,
    /// How many sessions to submit (the goals repeat after the built-in dozen).
    #[arg(long, default_value_t = 24, value_parser = clap::value_parser!(u32).range(1..))]
    count: u32,
    /// The agent to run.
    #[arg(long, default_value = "support")]
    agent: String,
    /// How long to wait for all sessions, in seconds.
    #[arg(long, default_value_t = 120)]
    timeout_s: u64,
    /// How often to poll each session, in milliseconds.
    #[arg(long, default_value_t = 250)]
    poll_ms: u64,
    /// Only declare the RabbitMQ queues of this config file, then exit (`scripts/demo.sh` does this
    /// before it starts the fleet): a queue an earlier release declared with other arguments is
    /// deleted when empty; one that holds messages stops the demo with what to do.
    #[arg(long, value_name = "CONFIG")]
    prepare_queues: Option<std::path::PathBuf>,
}

/// Where a session stands, as `GET /v1/sessions/{id}` reports it (only the fields shown here).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct View {
    status: String,
    step: u64,
    error: Option<String>,
    usage: Usage,
}

impl View {
    /// Agent steps done: the API's count when it gives one, else the current step.
    fn steps(&self) -> u64 {
        self.usage.steps.unwrap_or(self.step)
    }
}

/// A session's token use and cost.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
struct Usage {
    input_tokens: u64,
    output_tokens: u64,
    cache_read_input_tokens: u64,
    cache_creation_input_tokens: u64,
    cost_usd: f64,
    steps: Option<u64>,
}

impl Usage {
    /// Every input token: plain, written to the prompt cache, and read from it.
    fn all_input(&self) -> u64 {
        self.input_tokens + self.cache_read_input_tokens + self.cache_creation_input_tokens
    }
}

/// The answer to `POST /v1/sessions`.
#[derive(Debug, Deserialize)]
struct Created {
    id: String,
    status: String,
}

/// The API's error shape: `{"error": {"type", "message"}}`.
#[derive(Debug, Deserialize)]
struct ErrorBody {
    error: ErrorDetail,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    #[serde(rename = "type")]
    kind: String,
    message: String,
}

/// One demo session from submission to outcome.
struct Tracked {
    n: u32,
    goal: &'static Goal,
    id: Option<String>,
    view: Option<View>,
    /// Set once the session reached an outcome (or could not be submitted).
    done: bool,
    /// The last problem seen: a failed submission or a failed poll.
    problem: Option<String>,
}

impl Tracked {
    /// The outcome shown in the table.
    fn outcome(&self) -> String {
        match (&self.id, &self.view) {
            (None, _) => "not_submitted".to_owned(),
            (Some(_), Some(v)) if self.done => v.status.clone(),
            (Some(_), Some(v)) => format!("timed_out ({})", v.status),
            (Some(_), None) => "timed_out (never seen)".to_owned(),
        }
    }

    /// Whether the demo counts this session as a success.
    fn succeeded(&self) -> bool {
        self.done && self.view.as_ref().is_some_and(|v| is_good(&v.status))
    }
}

/// A thin client of the dispatcher's API.
struct Api {
    http: reqwest::Client,
    base: String,
    ops: String,
}

impl Api {
    fn new(args: &Args) -> anyhow::Result<Self> {
        let mut headers = reqwest::header::HeaderMap::new();
        let bearer = reqwest::header::HeaderValue::from_str(&format!("Bearer {}", args.token))
            .context("the token is not a valid header value")?;
        headers.insert(reqwest::header::AUTHORIZATION, bearer);
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .default_headers(headers)
            .build()
            .context("building the client")?;
        let trim = |u: &str| u.trim_end_matches('/').to_owned();
        Ok(Self { http, base: trim(&args.url), ops: trim(&args.ops_url) })
    }

    /// Fails with a clear message when the dispatcher does not answer `/healthz`.
    async fn check_reachable(&self) -> anyhow::Result<()> {
        let url = format!("{}/healthz", self.ops);
        let response = self.http.get(&url).send().await.with_context(|| {
            format!("cannot reach the dispatcher at {}; is it running? (`bash scripts/demo.sh` starts one)", self.base)
        })?;
        decode::<Value>(response).await.map(drop).with_context(|| format!("GET {url}"))
    }

    async fn create(&self, body: &Value) -> anyhow::Result<Created> {
        let url = format!("{}/v1/sessions", self.base);
        let response = self.http.post(&url).json(body).send().await.with_context(|| format!("POST {url}"))?;
        decode(response).await.with_context(|| format!("POST {url}"))
    }

    async fn session(&self, id: &str) -> anyhow::Result<View> {
        let url = format!("{}/v1/sessions/{id}", self.base);
        let response = self.http.get(&url).send().await.with_context(|| format!("GET {url}"))?;
        decode(response).await.with_context(|| format!("GET {url}"))
    }
}

/// The body as `T` on a 2xx; otherwise an error carrying the API's own message.
async fn decode<T: DeserializeOwned>(response: reqwest::Response) -> anyhow::Result<T> {
    let status = response.status();
    let text = response.text().await.context("reading the response body")?;
    if !status.is_success() {
        match serde_json::from_str::<ErrorBody>(&text) {
            Ok(body) => bail!("HTTP {status}: {}: {}", body.error.kind, body.error.message),
            Err(_) => bail!("HTTP {status}: {}", truncate(text.trim(), 200)),
        }
    }
    serde_json::from_str(&text).with_context(|| format!("unexpected response body: {}", truncate(&text, 200)))
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    if let Some(config) = &args.prepare_queues {
        return match queues::prepare(config).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("agentfleet-demo: {e:#}");
                ExitCode::from(2)
            }
        };
    }
    match run(&args).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("agentfleet-demo: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// The whole demo; `Ok(false)` when some session did not reach a good outcome.
async fn run(args: &Args) -> anyhow::Result<bool> {
    let api = Api::new(args)?;
    api.check_reachable().await?;
    let started = Instant::now();
    let run_id = ulid::Ulid::new().to_string().to_lowercase();
    println!("Submitting {} sessions to agent `{}` at {} …", args.count, args.agent, args.url);
    let mut sessions = submit_all(&api, args, &run_id).await;
    if pending(&sessions) > 0 {
        println!("\nWaiting for outcomes (polling every {} ms, up to {} s) …", args.poll_ms, args.timeout_s);
        poll_until_done(&api, args, &mut sessions).await;
    }
    print_table(&sessions);
    print_totals(&sessions);
    println!("\nElapsed: {:.1} s", started.elapsed().as_secs_f64());
    Ok(report_verdict(&sessions))
}

/// Submits every session in order, printing one line each; failures are recorded, not fatal.
async fn submit_all(api: &Api, args: &Args, run_id: &str) -> Vec<Tracked> {
    let mut sessions = Vec::new();
    for (i, goal) in (1..=args.count).zip(GOALS.iter().cycle()) {
        let body = json!({
            "agent": args.agent,
            "input": goal.text,
            "metadata": { "demo": true, "n": i },
            "idempotency_key": format!("demo-{run_id}-{i}"),
        });
        let mut tracked = Tracked { n: i, goal, id: None, view: None, done: false, problem: None };
        match api.create(&body).await {
            Ok(created) => {
                println!("→ #{i:<3} {}  {:<8} {}", created.id, created.status, quoted(goal.text, 60));
                tracked.id = Some(created.id);
            }
            Err(e) => {
                println!("✗ #{i:<3} not submitted: {e:#}");
                tracked.done = true;
                tracked.problem = Some(format!("{e:#}"));
            }
        }
        sessions.push(tracked);
    }
    sessions
}

/// Polls the pending sessions until all reached an outcome or the timeout passed.
async fn poll_until_done(api: &Api, args: &Args, sessions: &mut [Tracked]) {
    let deadline = Instant::now() + Duration::from_secs(args.timeout_s);
    let mut next_progress = Instant::now() + Duration::from_secs(5);
    while sessions.iter().any(|s| !s.done) {
        poll_once(api, sessions).await;
        if Instant::now() >= deadline {
            println!("Timed out after {} s with {} sessions still open.", args.timeout_s, pending(sessions));
            return;
        }
        if Instant::now() >= next_progress && pending(sessions) > 0 {
            print_progress(sessions);
            next_progress += Duration::from_secs(5);
        }
        tokio::time::sleep(Duration::from_millis(args.poll_ms)).await;
    }
}

/// One round: reads every pending session at once and prints those that reached an outcome.
async fn poll_once(api: &Api, sessions: &mut [Tracked]) {
    let open: Vec<&mut Tracked> = sessions.iter_mut().filter(|s| !s.done).collect();
    let reads = open.iter().map(|s| api.session(s.id.as_deref().unwrap_or_default()));
    let results = futures::future::join_all(reads).await;
    for (tracked, result) in open.into_iter().zip(results) {
        record(tracked, result);
    }
}

/// Stores one poll's result, printing the outcome line or the first error of a session.
fn record(tracked: &mut Tracked, result: anyhow::Result<View>) {
    match result {
        Ok(view) => {
            tracked.done = is_outcome(&view.status);
            tracked.problem = None;
            tracked.view = Some(view);
            if tracked.done {
                print_outcome(tracked);
            }
        }
        Err(e) => {
            let message = format!("{e:#}");
            if tracked.problem.as_deref() != Some(message.as_str()) {
                println!("! #{:<3} polling failed (will retry): {message}", tracked.n);
            }
            tracked.problem = Some(message);
        }
    }
}

/// Statuses the demo stops waiting at: the final ones, the pauses for people, and `paused` (a daily
/// spend cap was reached; the session retries every 10 minutes, far beyond the demo's patience).
fn is_outcome(status: &str) -> bool {
    is_good(status) || matches!(status, "failed" | "budget_exhausted" | "cancelled" | "paused")
}

/// Outcomes the demo counts as success: done, or handed to people as the agent is told to.
fn is_good(status: &str) -> bool {
    matches!(status, "completed" | "awaiting_human" | "awaiting_approval")
}

fn pending(sessions: &[Tracked]) -> usize {
    sessions.iter().filter(|s| !s.done).count()
}

fn print_outcome(tracked: &Tracked) {
    let (Some(id), Some(view)) = (&tracked.id, &tracked.view) else { return };
    let mark = match view.status.as_str() {
        "completed" => "✓",
        "awaiting_human" | "awaiting_approval" => "⚑",
        _ => "✗",
    };
    let usage = &view.usage;
    println!(
        "{mark} {id} {:<16} {:>2} steps  {:>7} in ({:>6} cached) / {:>6} out tokens  ${:.4}  {}",
        view.status,
        view.steps(),
        thousands(usage.all_input()),
        thousands(usage.cache_read_input_tokens),
        thousands(usage.output_tokens),
        usage.cost_usd,
        quoted(tracked.goal.text, 40),
    );
    if let Some(error) = view.error.as_deref().filter(|e| !e.is_empty()) {
        println!("    error: {error}");
    }
}

fn print_progress(sessions: &[Tracked]) {
    let mut by_status: BTreeMap<String, usize> = BTreeMap::new();
    for s in sessions.iter().filter(|s| !s.done) {
        let status = s.view.as_ref().map_or("unknown", |v| v.status.as_str());
        *by_status.entry(status.to_owned()).or_default() += 1;
    }
    let open: Vec<String> = by_status.iter().map(|(status, n)| format!("{n} {status}")).collect();
    println!("… {}/{} done; open: {}", sessions.len() - pending(sessions), sessions.len(), open.join(", "));
}

fn print_table(sessions: &[Tracked]) {
    println!(
        "\n{:<4} {:<28} {:<22} {:<24} {:>5} {:>9} {:>9} {:>8} {:>9}",
        "#", "session", "goal", "outcome", "steps", "in tok", "cached", "out tok", "cost"
    );
    println!("{}", "─".repeat(126));
    for s in sessions {
        let usage = s.view.as_ref().map(|v| &v.usage);
        println!(
            "{:<4} {:<28} {:<22} {:<24} {:>5} {:>9} {:>9} {:>8} {:>9}",
            s.n,
            s.id.as_deref().unwrap_or("-"),
            truncate(s.goal.label, 22),
            truncate(&s.outcome(), 24),
            s.view.as_ref().map_or(0, View::steps),
            thousands(usage.map_or(0, Usage::all_input)),
            thousands(usage.map_or(0, |u| u.cache_read_input_tokens)),
            thousands(usage.map_or(0, |u| u.output_tokens)),
            format!("${:.4}", usage.map_or(0.0, |u| u.cost_usd)),
        );
    }
}

/// Sums over the sessions of one outcome.
#[derive(Default)]
struct Totals {
    sessions: usize,
    steps: u64,
    input_tokens: u64,
    cached_tokens: u64,
    output_tokens: u64,
    cost_usd: f64,
}

impl Totals {
    fn add(&mut self, s: &Tracked) {
        self.sessions += 1;
        if let Some(v) = &s.view {
            self.steps += v.steps();
            self.input_tokens += v.usage.all_input();
            self.cached_tokens += v.usage.cache_read_input_tokens;
            self.output_tokens += v.usage.output_tokens;
            self.cost_usd += v.usage.cost_usd;
        }
    }

    fn print(&self, label: &str) {
        println!(
            "{label:<24} {:>8} {:>6} {:>10} {:>10} {:>9} {:>10}",
            self.sessions,
            self.steps,
            thousands(self.input_tokens),
            thousands(self.cached_tokens),
            thousands(self.output_tokens),
            format!("${:.4}", self.cost_usd)
        );
    }
}

fn print_totals(sessions: &[Tracked]) {
    let mut by_outcome: BTreeMap<String, Totals> = BTreeMap::new();
    let mut all = Totals::default();
    for s in sessions {
        by_outcome.entry(s.outcome()).or_default().add(s);
        all.add(s);
    }
    println!(
        "\n{:<24} {:>8} {:>6} {:>10} {:>10} {:>9} {:>10}",
        "outcome", "sessions", "steps", "in tok", "cached", "out tok", "cost"
    );
    println!("{}", "─".repeat(83));
    for (outcome, totals) in &by_outcome {
        totals.print(outcome);
    }
    println!("{}", "─".repeat(83));
    all.print("total");
}

/// Prints which sessions fell short, if any; true when none did.
fn report_verdict(sessions: &[Tracked]) -> bool {
    let failed: Vec<&Tracked> = sessions.iter().filter(|s| !s.succeeded()).collect();
    if failed.is_empty() {
        println!("All {} sessions completed or were handed to people.", sessions.len());
        return true;
    }
    println!("\n{} of {} sessions did not complete or reach people:", failed.len(), sessions.len());
    for s in failed {
        let why = s.view.as_ref().and_then(|v| v.error.clone()).or_else(|| s.problem.clone()).unwrap_or_default();
        println!("  #{:<3} {} {}  {}", s.n, s.id.as_deref().unwrap_or("-"), s.outcome(), why);
    }
    false
}

/// `1234567` → `1,234,567`.
fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// At most `max` characters of `text`, with `…` when cut.
fn truncate(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        return text.to_owned();
    }
    let mut cut: String = text.chars().take(max.saturating_sub(1)).collect();
    cut.push('…');
    cut
}

/// `text` truncated and in double quotes.
fn quoted(text: &str, max: usize) -> String {
    format!("\"{}\"", truncate(text, max))
}

/// The demo's queues, declared before its fleet starts.
mod queues {
    use std::path::Path;

    use agentfleet::amqp::{AmqpPublisher, PublishError, QueueMismatch, Topology};
    use agentfleet::config::Config;
    use agentfleet::domain::Name;
    use anyhow::{Context as _, bail};
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::FieldTable;

    /// How long the broker may take to answer the declarations.
    const PATIENCE: std::time::Duration = std::time::Duration::from_secs(60);

    /// Declares every queue of the config's prefix, as the dispatcher and the workers will. A queue
    /// that an earlier release declared with other arguments (RabbitMQ cannot change them) is
    /// deleted if it is empty, and declared afresh: the demo's prefix holds only the demo's own
    /// queues. A stale queue that still holds messages is left alone, and the demo stops with the
    /// reason and the fix.
    pub(super) async fn prepare(path: &Path) -> anyhow::Result<()> {
        let cfg = Config::load(path, &|k| std::env::var(k).ok())?;
        for _ in 0..32 {
            let declared = tokio::time::timeout(PATIENCE, declare(&cfg)).await;
            let declared = declared.with_context(|| format!("RabbitMQ did not answer within {PATIENCE:?}"))?;
            let Some(stale) = declared? else { return Ok(()) };
            delete_if_empty(&cfg.amqp.url, &stale).await?;
            println!(
                "    deleted the empty queue `{}`: an earlier release declared it with other arguments",
                stale.queue
            );
        }
        bail!("the queues under `{}` still differ after 32 deletions", cfg.amqp.prefix)
    }

    /// Declares the topology and the webhook queues; the first queue found with other arguments.
    async fn declare(cfg: &Config) -> anyhow::Result<Option<QueueMismatch>> {
        let (url, prefix) = (&cfg.amqp.url, &cfg.amqp.prefix);
        let mut pools: Vec<Name> =
            cfg.agents.values().map(|a| a.pool.clone()).chain(cfg.worker.pools.clone()).collect();
        pools.sort();
        pools.dedup();
        let declared = match AmqpPublisher::connect(url, "demo/prepare", Topology::from_config(&cfg.amqp), pools).await
        {
            Ok(publisher) => agentfleet_dispatcher::declare_webhook_queues(&publisher, prefix).await,
            Err(e) => Err(e),
        };
        match declared {
            Ok(()) => Ok(None),
            Err(PublishError::Topology(stale)) => Ok(Some(stale)),
            Err(e) => Err(e).context("declaring the queues"),
        }
    }

    /// Deletes the queue when it holds no message. (Quorum queues do not take `if_empty` on a
    /// delete, so it counts first; nothing consumes before the demo's fleet starts.)
    async fn delete_if_empty(url: &str, stale: &QueueMismatch) -> anyhow::Result<()> {
        let conn = agentfleet::amqp::connect(url, "demo/prepare").await?;
        let deleted = async {
            let ch = conn.create_channel().await?;
            let passive = QueueDeclareOptions { passive: true, ..Default::default() };
            let queue = ch.queue_declare(stale.queue.as_str().into(), passive, FieldTable::default()).await?;
            if queue.message_count() > 0 {
                bail!("{stale}. It holds {} messages, so the demo leaves it alone", queue.message_count());
            }
            ch.queue_delete(stale.queue.as_str().into(), QueueDeleteOptions::default()).await?;
            Ok(())
        }
        .await;
        let _ = conn.close(200, "done".into()).await;
        deleted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thousands_groups_digits() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1_234), "1,234");
        assert_eq!(thousands(1_234_567), "1,234,567");
    }

    #[test]
    fn truncate_counts_characters() {
        assert_eq!(truncate("short", 10), "short");
        assert_eq!(truncate("Password reset please", 9), "Password…");
        assert_eq!(truncate(&"é".repeat(30), 5).chars().count(), 5);
    }

    #[test]
    fn escalations_are_good_outcomes() {
        assert!(is_outcome("awaiting_human") && is_good("awaiting_human"));
        assert!(is_outcome("awaiting_approval") && is_good("awaiting_approval"));
        assert!(is_outcome("failed") && !is_good("failed"));
        assert!(is_outcome("paused") && !is_good("paused"));
        assert!(!is_outcome("running") && !is_outcome("queued"));
    }

    #[test]
    fn goals_say_what_they_are_meant_to() {
        let asks_for_person =
            |g: &Goal| ["human", "refund", "manager", "agent"].iter().any(|w| g.text.to_lowercase().contains(w));
        let escalating: Vec<&str> = GOALS.iter().filter(|g| asks_for_person(g)).map(|g| g.label).collect();
        assert_eq!(escalating, ["Refund request", "Wants a person", "Angry, wants manager"]);
    }
}
