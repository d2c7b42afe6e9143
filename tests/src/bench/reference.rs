//! The reference: `steploop-proto`, the bare step protocol (`../shared/bench/steploop-proto`), run
//! against the same model and tool servers as the fleet, with the same counters read around it.
//!
//! The prototype measures its own window (steps/s, CPU per step of each process, the mean request
//! size) and prints it; this module runs it, reads those lines, and adds what it does not measure:
//! Redis commands and bytes and RabbitMQ messages per step, from counters read before it starts
//! and after it exits, over the steps the model server answered in between.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::probe::Snapshot;
use super::round;

/// What to run.
#[derive(Debug, Clone)]
pub struct ReferenceOptions {
    /// A name for the result (`3kb`, `10kb`, `3kb-classic`).
    pub label: String,
    /// The `steploop-proto` binary.
    pub binary: PathBuf,
    /// Its arguments (`--steps 5 --vary --raw …`); `--fa` and `--ts` are added.
    pub args: Vec<String>,
    /// The model server.
    pub model_url: String,
    /// The tool server.
    pub tool_url: String,
    /// The Redis it uses (its own default: the local one).
    pub redis_url: String,
    /// Longest it may run.
    pub timeout: Duration,
}

/// The figures of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ReferenceResult {
    /// [`ReferenceOptions::label`].
    pub label: String,
    /// Its arguments.
    pub args: Vec<String>,
    /// Steps per second over its window.
    pub steps_per_s: f64,
    /// Latency from delivery to ack, p50 and p99, in ms.
    pub latency_p50_ms: f64,
    /// p99.
    pub latency_p99_ms: f64,
    /// The mean model request in bytes, as it measured it.
    pub avg_request_bytes: f64,
    /// CPU µs per step of each process it watches (`steploop-proto`, `beam.smp`, `redis-server`,
    /// the servers, `other`), and `machine`.
    pub cpu_us_per_step: BTreeMap<String, f64>,
    /// How busy the machine was, in cores.
    pub machine_busy_cores: f64,
    /// Its line about sessions lost after the drain.
    pub drain: String,
    /// Its errors.
    pub errors: u64,
    /// Steps over the whole run (the model server's answers), over which the counters are divided.
    pub steps: u64,
    /// Redis commands per step (a script's own calls included), over the whole run.
    pub redis_commands_per_step: f64,
    /// The same by command.
    pub redis_commands_by_command: BTreeMap<String, f64>,
    /// Bytes Redis read per step.
    pub redis_bytes_in_per_step: f64,
    /// RabbitMQ messages per step by counter.
    pub rabbitmq_per_step: BTreeMap<String, f64>,
    /// Everything it printed on stdout.
    pub output: String,
}

/// Runs it and reads its figures.
pub async fn run(o: &ReferenceOptions) -> anyhow::Result<ReferenceResult> {
    let before = Snapshot::take(&o.redis_url, &o.model_url, true).await?;
    let mut cmd = tokio::process::Command::new(&o.binary);
    cmd.args(&o.args).args(["--fa", &o.model_url, "--ts", &o.tool_url]).kill_on_drop(true);
    let out = tokio::time::timeout(o.timeout, cmd.output())
        .await
        .with_context(|| format!("{} ran longer than {:?}", o.binary.display(), o.timeout))?
        .with_context(|| format!("running {}", o.binary.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("{} failed: {stdout}{}", o.binary.display(), String::from_utf8_lossy(&out.stderr));
    }
    let after = Snapshot::take(&o.redis_url, &o.model_url, false).await?;
    let mut r = parse(&stdout).with_context(|| format!("reading the reference's output:\n{stdout}"))?;
    (r.label, r.args, r.output) = (o.label.clone(), o.args.clone(), stdout);
    let delta = before.until(&after);
    r.steps = delta.model("answered_total");
    let per = |n: f64| round(n / r.steps.max(1) as f64, 3);
    r.redis_commands_per_step = per(delta.redis_calls.values().sum::<u64>() as f64);
    r.redis_commands_by_command = delta.redis_calls.iter().map(|(c, n)| (c.clone(), per(*n as f64))).collect();
    r.redis_bytes_in_per_step = round(delta.redis_net_input_bytes as f64 / r.steps.max(1) as f64, 0);
    r.rabbitmq_per_step =
        delta.rabbitmq.iter().map(|(k, n)| (k.clone(), per(*n as f64))).filter(|(_, n)| *n != 0.0).collect();
    Ok(r)
}

/// Its report:
///
/// ```text
/// steps/s 2710 (first half 2700, second half 2720); latency ms p50 80.1 p99 200.5; avg LLM request 3.1 KB; rss 60 MB
/// cpu (% of one core, us/step): steploop-proto 66% 245us | beam.smp 50% 180us | … | other 20us | machine busy 95% of 2 cores, 700us/step
/// finished 5000 dropped 0 errors 0
/// after drain: 1000 step messages for 1000 distinct sessions (live sessions: 1000)
/// ```
fn parse(text: &str) -> anyhow::Result<ReferenceResult> {
    let mut r = ReferenceResult::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("steps/s ") {
            r.steps_per_s = number_after(rest, "").context("steps/s")?;
            r.latency_p50_ms = number_after(rest, "p50 ").unwrap_or(0.0);
            r.latency_p99_ms = number_after(rest, "p99 ").unwrap_or(0.0);
            r.avg_request_bytes = round(number_after(rest, "avg LLM request ").unwrap_or(0.0) * 1024.0, 0);
        } else if let Some((_, rest)) = line.split_once("us/step): ") {
            cpu(rest, &mut r);
        } else if let Some(rest) = line.strip_prefix("finished ") {
            r.errors = number_after(rest, "errors ").unwrap_or(0.0) as u64;
        } else if line.starts_with("after drain:") {
            r.drain = line.to_owned();
        }
    }
    anyhow::ensure!(r.steps_per_s > 0.0, "no `steps/s` line");
    Ok(r)
}

/// The `name P% Nus` parts of the CPU line, and the machine's share.
fn cpu(line: &str, r: &mut ReferenceResult) {
    for part in line.split('|').map(str::trim) {
        if let Some(rest) = part.strip_prefix("machine busy ") {
            let pct = number_after(rest, "").unwrap_or(0.0);
            let cores = number_after(rest, "of ").unwrap_or(0.0);
            r.machine_busy_cores = round(pct / 100.0 * cores, 2);
            if let Some(us) = rest.rsplit_once(", ").and_then(|(_, us)| number_after(us, "")) {
                r.cpu_us_per_step.insert(super::procfs::MACHINE.into(), us);
            }
            continue;
        }
        let words: Vec<&str> = part.split_whitespace().collect();
        if let Some(us) = words.last().and_then(|w| w.strip_suffix("us")).and_then(|n| n.parse().ok()) {
            let name = words
                .iter()
                .take_while(|w| !w.ends_with('%') && !w.ends_with("us"))
                .copied()
                .collect::<Vec<_>>()
                .join(" ");
            r.cpu_us_per_step.insert(name, us);
        }
    }
}

/// The number right after `label` in `text` (the first number when `label` is empty).
fn number_after(text: &str, label: &str) -> Option<f64> {
    let rest = if label.is_empty() { text } else { text.split_once(label)?.1 };
    let n: String = rest.trim_start().chars().take_while(|c| c.is_ascii_digit() || *c == '.').collect();
    n.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "steps/s 2710 (first half 2700, second half 2720); latency ms p50 80.1 p99 200.5; avg LLM request 3.1 KB; rss 60 MB
cpu (% of one core, us/step): steploop-proto 66% 245us | beam.smp 50% 180us | redis-server 20% 75us | agentfleet-mode 30% 110us | agentfleet-tool 5% 20us | other 15us | machine busy 95% of 2 cores, 700us/step
finished 5000 dropped 0 errors 2
after drain: 1000 step messages for 1000 distinct sessions (live sessions: 1000)
";

    #[test]
    fn reads_the_prototype_report() {
        let r = parse(OUT).unwrap_or_default();
        assert_eq!(r.steps_per_s, 2710.0);
        assert_eq!((r.latency_p50_ms, r.latency_p99_ms), (80.1, 200.5));
        assert_eq!(r.avg_request_bytes, 3174.0);
        assert_eq!(r.cpu_us_per_step["steploop-proto"], 245.0);
        assert_eq!(r.cpu_us_per_step["agentfleet-mode"], 110.0);
        assert_eq!(r.cpu_us_per_step["other"], 15.0);
        assert_eq!(r.cpu_us_per_step["machine"], 700.0);
        assert_eq!(r.machine_busy_cores, 1.9);
        assert_eq!(r.errors, 2);
        assert!(r.drain.starts_with("after drain: 1000"));
    }

    #[test]
    fn a_run_without_figures_is_an_error() {
        assert!(parse("setup failed\n").is_err());
    }
}
