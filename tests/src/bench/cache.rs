//! Prompt caching in dollars: the same sessions with `prompt_cache = "auto"` and `"off"`.
//!
//! One fleet per setting, each with its own scripted model server (whose prompt cache starts
//! empty), runs the same workloads:
//! - the demo's goals (`agentfleet-demo`), with the demo's system prompt;
//! - `[steps=12]` sessions with 1.2 KB and 7 KB of filler in the goal (as the `steps` bench pads
//!   its ~3 KB and ~10 KB requests).
//!
//! For each workload and setting it reads every session's `usage` (`GET /v1/sessions/{id}`) and
//! trace (`GET /v1/sessions/{id}/trace`): dollars per session, the input part of it (plain input,
//! cache writes and cache reads), the cache tokens, and whether each session's recorded cost equals
//! the sum of its trace records. Then the reduction `auto` brings.

use std::path::Path;
use std::time::Duration;

use anyhow::Context as _;
use serde::Serialize;
use serde_json::{Value, json};

use super::load::Shape;
use crate::demo_goals::GOALS;
use crate::fleet::{FleetOptions, TestFleet};

/// What a run does.
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Sessions per `[steps=12]` workload.
    pub sessions: u64,
    /// Demo sessions (the goals repeat after the built-in dozen).
    pub demo_sessions: u64,
    /// The demo's config, for its system prompt.
    pub demo_config: std::path::PathBuf,
    /// Worker processes.
    pub workers: usize,
}

/// The figures of one workload under one setting.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Costs {
    /// Sessions.
    pub sessions: u64,
    /// Mean steps per session.
    pub steps_per_session: f64,
    /// Mean input tokens per model call (plain, written and read together).
    pub input_tokens_per_call: f64,
    /// Mean cost per session, USD.
    pub usd_per_session: f64,
    /// Mean input cost per session (plain input, cache writes and reads), USD.
    pub input_usd_per_session: f64,
    /// Mean output cost per session, USD.
    pub output_usd_per_session: f64,
    /// Tokens over all sessions: plain input, written to the cache, read from it.
    pub input_tokens: u64,
    /// Cache writes.
    pub cache_creation_input_tokens: u64,
    /// Cache reads.
    pub cache_read_input_tokens: u64,
    /// Sessions whose recorded cost differs from the sum of their trace records (must be 0).
    pub trace_mismatches: u64,
    /// Sessions whose cost parts do not add up to their cost (must be 0).
    pub breakdown_mismatches: u64,
}

/// One workload, both settings.
#[derive(Debug, Clone, Serialize)]
pub struct Workload {
    /// What ran.
    pub name: String,
    /// Caching `auto`.
    pub auto: Costs,
    /// Caching off.
    pub off: Costs,
    /// 1 − auto/off of the input cost per session.
    pub input_cost_reduction: f64,
    /// 1 − auto/off of the whole cost per session.
    pub cost_reduction: f64,
}

/// The result of a run.
#[derive(Debug, Clone, Serialize)]
pub struct CacheResult {
    /// The workloads.
    pub workloads: Vec<Workload>,
    /// The model of the `support` agent, whose prices apply.
    pub model: String,
}

/// The workloads: a name and the request bodies of its sessions.
fn workloads(o: &CacheOptions) -> Vec<(String, Vec<Value>)> {
    let demo = (0..o.demo_sessions)
        .map(|i| json!({"agent": "support", "input": GOALS[i as usize % GOALS.len()].text}))
        .collect();
    let steps = |pad_bytes: usize| -> Vec<Value> {
        let shape = Shape { steps: 12, vary: false, pad_bytes };
        (0..o.sessions).map(|i| shape.body(i)).collect()
    };
    vec![
        (format!("demo goals ({} sessions)", o.demo_sessions), demo),
        (format!("[steps=12] + 1.2 KB of filler ({} sessions)", o.sessions), steps(1_200)),
        (format!("[steps=12] + 7 KB of filler ({} sessions)", o.sessions), steps(7_000)),
    ]
}

/// Runs every workload with caching `auto`, then `off`.
pub async fn run(o: &CacheOptions) -> anyhow::Result<CacheResult> {
    let system_prompt = demo_system_prompt(&o.demo_config)?;
    let mut by_setting = Vec::new();
    for setting in ["auto", "off"] {
        let fleet = TestFleet::start(FleetOptions {
            workers: o.workers,
            concurrency: 64,
            lease_ms: 30_000,
            max_steps: 20,
            system_prompt: system_prompt.clone(),
            agent_config: format!("prompt_cache = \"{setting}\""),
            ..Default::default()
        })
        .await?;
        fleet.wait_ready(Duration::from_secs(30)).await?;
        let mut costs = Vec::new();
        for (name, bodies) in workloads(o) {
            eprintln!("cache bench: {name}, prompt_cache = {setting}");
            costs.push(measure(&fleet, &bodies).await.with_context(|| format!("{name}, {setting}"))?);
        }
        fleet.cleanup().await?;
        by_setting.push(costs);
    }
    let off = by_setting.pop().unwrap_or_default();
    let auto = by_setting.pop().unwrap_or_default();
    let reduction = |a: f64, b: f64| if b > 0.0 { 1.0 - a / b } else { 0.0 };
    let workloads = workloads(o)
        .into_iter()
        .zip(auto.into_iter().zip(off))
        .map(|((name, _), (auto, off))| Workload {
            name,
            input_cost_reduction: reduction(auto.input_usd_per_session, off.input_usd_per_session),
            cost_reduction: reduction(auto.usd_per_session, off.usd_per_session),
            auto,
            off,
        })
        .collect();
    Ok(CacheResult { workloads, model: "claude-sonnet-4-5".into() })
}

/// The demo config's `agents.support.system_prompt`.
fn demo_system_prompt(path: &Path) -> anyhow::Result<String> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let config: toml::Value = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    config["agents"]["support"]["system_prompt"]
        .as_str()
        .map(str::to_owned)
        .with_context(|| format!("{} has no agents.support.system_prompt", path.display()))
}

/// Runs the sessions to their end and adds up what they cost.
async fn measure(fleet: &TestFleet, bodies: &[Value]) -> anyhow::Result<Costs> {
    let mut ids = Vec::with_capacity(bodies.len());
    for body in bodies {
        ids.push(fleet.submit_json(body).await?);
    }
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(600)).await?;
    let mut c = Costs { sessions: sessions.len() as u64, ..Costs::default() };
    let (mut micro, mut input_micro, mut output_micro, mut steps, mut calls) = (0u64, 0u64, 0u64, 0u64, 0u64);
    for (id, s) in ids.iter().zip(&sessions) {
        let u = &s["usage"];
        let n = |v: &Value, field: &str| v[field].as_u64().unwrap_or(0);
        let b = &u["cost_breakdown"];
        let cost = n(u, "cost_micro_usd");
        micro += cost;
        input_micro += n(b, "input_micro_usd") + n(b, "cache_write_micro_usd") + n(b, "cache_read_micro_usd");
        output_micro += n(b, "output_micro_usd");
        steps += n(u, "steps");
        calls += n(u, "model_calls");
        c.input_tokens += n(u, "input_tokens");
        c.cache_creation_input_tokens += n(u, "cache_creation_input_tokens");
        c.cache_read_input_tokens += n(u, "cache_read_input_tokens");
        let parts: u64 = ["input_micro_usd", "cache_write_micro_usd", "cache_read_micro_usd", "output_micro_usd"]
            .iter()
            .map(|f| n(b, f))
            .sum::<u64>()
            + n(b, "unreconciled_micro_usd");
        c.breakdown_mismatches += u64::from(parts != cost);
        let trace = fleet.trace(id).await?;
        c.trace_mismatches += u64::from(n(&trace["summary"], "cost_micro_usd") != cost);
    }
    let per = |m: u64| m as f64 / 1e6 / c.sessions.max(1) as f64;
    c.usd_per_session = per(micro);
    c.input_usd_per_session = per(input_micro);
    c.output_usd_per_session = per(output_micro);
    c.steps_per_session = steps as f64 / c.sessions.max(1) as f64;
    let all_input = c.input_tokens + c.cache_creation_input_tokens + c.cache_read_input_tokens;
    c.input_tokens_per_call = all_input as f64 / calls.max(1) as f64;
    Ok(c)
}

/// The result as a markdown table.
pub fn markdown(r: &CacheResult) -> String {
    let mut out = format!(
        "Prices of `{}`. Input cost = plain input + cache writes + cache reads.\n\n\
         | sessions | setting | steps/session | input tokens/call | $/session | input $/session | cache read / written / plain input tokens | trace = cost |\n\
         |---|---|---|---|---|---|---|---|\n",
        r.model
    );
    for w in &r.workloads {
        for (setting, c) in [("auto", &w.auto), ("off", &w.off)] {
            out.push_str(&format!(
                "| {} | `{setting}` | {:.1} | {:.0} | {:.6} | {:.6} | {} / {} / {} | {} |\n",
                w.name,
                c.steps_per_session,
                c.input_tokens_per_call,
                c.usd_per_session,
                c.input_usd_per_session,
                c.cache_read_input_tokens,
                c.cache_creation_input_tokens,
                c.input_tokens,
                if c.trace_mismatches == 0 && c.breakdown_mismatches == 0 {
                    "✅".to_owned()
                } else {
                    format!("❌ {} differ", c.trace_mismatches + c.breakdown_mismatches)
                },
            ));
        }
        out.push_str(&format!(
            "| {} | **`auto` saves** | | | **{:.0}%** | **{:.0}%** of input | | |\n",
            w.name,
            100.0 * w.cost_reduction,
            100.0 * w.input_cost_reduction
        ));
    }
    out
}
