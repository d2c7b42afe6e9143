//! Intake: sessions created per second over HTTP, and the latency of `POST /v1/sessions`, measured
//! by `wrk` against the fleet's dispatcher (in this process, on a TCP port like any other).
//!
//! No worker runs, so the dispatcher has the machine to itself besides `wrk`, RabbitMQ and Redis;
//! the sessions it creates wait in the step queue and go with the fleet's cleanup. The sessions
//! created are counted in Redis, not taken from `wrk`'s count of answers.

use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};

use super::load::{Load, Shape};
use super::{Bench, FleetSetup, procfs, round};
use crate::fleet::ADMIN_TOKEN;

/// What to run.
#[derive(Debug, Clone)]
pub struct IntakeOptions {
    /// How long `wrk` runs.
    pub duration: Duration,
    /// Its connections.
    pub connections: u32,
    /// Its threads.
    pub threads: u32,
}

/// The figures of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct IntakeResult {
    /// `wrk`'s duration, in seconds.
    pub seconds: f64,
    /// Its connections.
    pub connections: u32,
    /// Its threads.
    pub threads: u32,
    /// Requests `wrk` completed.
    pub requests: u64,
    /// Answers other than 2xx/3xx.
    pub non_2xx: u64,
    /// Socket errors (connect, read, write, timeout).
    pub socket_errors: u64,
    /// Sessions the dispatcher created (counted in Redis).
    pub sessions_created: u64,
    /// Sessions created per second.
    pub sessions_per_s: f64,
    /// Latency percentiles in ms, as `wrk --latency` gives them.
    pub latency_p50_ms: Option<f64>,
    /// 90th percentile.
    pub latency_p90_ms: Option<f64>,
    /// 99th percentile.
    pub latency_p99_ms: Option<f64>,
    /// How busy the machine was while `wrk` ran (the dispatcher, `wrk`, RabbitMQ and Redis are
    /// the run's processes).
    pub busy: procfs::Busy,
}

/// The `wrk` script: a `POST /v1/sessions` of a one-step session with the harness's token.
fn script() -> String {
    format!(
        "wrk.method = \"POST\"\n\
         wrk.body = '{{\"agent\":\"support\",\"input\":\"[steps=1] Customer jane@example.com cannot reset her password.\"}}'\n\
         wrk.headers[\"Content-Type\"] = \"application/json\"\n\
         wrk.headers[\"Authorization\"] = \"Bearer {ADMIN_TOKEN}\"\n"
    )
}

/// Runs `wrk` against a fresh fleet without workers.
pub async fn run(setup: &FleetSetup, o: &IntakeOptions) -> anyhow::Result<IntakeResult> {
    let setup = FleetSetup { workers: 0, ..setup.clone() };
    let bench = Bench::start(&setup, 1).await?;
    let outcome = measure(&bench, o).await;
    bench.cleanup().await?;
    outcome
}

async fn measure(bench: &Bench, o: &IntakeOptions) -> anyhow::Result<IntakeResult> {
    let lua = bench.fleet.log_dir().join("intake.lua");
    std::fs::write(&lua, script())?;
    let url = format!("{}/v1/sessions", bench.fleet.api);
    let secs = o.duration.as_secs().max(1);
    let mut wrk = Command::new("wrk");
    wrk.args(["--latency", "-t", &o.threads.to_string(), "-c", &o.connections.to_string()])
        .args(["-d", &format!("{secs}s"), "--timeout", "10s", "-s"])
        .arg(&lua)
        .arg(&url);
    let (before, started) = (cpu_with_wrk(bench), std::time::Instant::now());
    let out = tokio::task::spawn_blocking(move || wrk.output())
        .await?
        .context("running wrk (install it: apt-get install -y wrk)")?;
    let busy = procfs::Busy::between(&before, &cpu_with_wrk(bench), started.elapsed().as_secs_f64());
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        bail!("wrk failed: {}{}", text, String::from_utf8_lossy(&out.stderr));
    }
    let load = Load::new(&bench.fleet, Shape { steps: 1, vary: false, pad_bytes: 0 }).await?;
    let created = load.live().count().await?;
    let mut r = parse(&text).with_context(|| format!("reading wrk's output:\n{text}"))?;
    r.seconds = secs as f64;
    (r.connections, r.threads, r.sessions_created) = (o.connections, o.threads, created);
    r.sessions_per_s = round(created as f64 / secs as f64, 0);
    r.busy = busy;
    Ok(r)
}

/// CPU seconds of the run's processes; `wrk`'s are those of this process's children that ended.
fn cpu_with_wrk(bench: &Bench) -> std::collections::BTreeMap<String, f64> {
    let mut cpu = bench.cpu_groups().cpu();
    cpu.insert("wrk".into(), procfs::ended_children_cpu_seconds(std::process::id()));
    cpu
}

/// The counts and percentiles of `wrk --latency`'s report.
fn parse(text: &str) -> anyhow::Result<IntakeResult> {
    let mut r = IntakeResult::default();
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["50%", v] => r.latency_p50_ms = ms(v),
            ["90%", v] => r.latency_p90_ms = ms(v),
            ["99%", v] => r.latency_p99_ms = ms(v),
            [n, "requests", "in", ..] => r.requests = n.parse().context("request count")?,
            ["Non-2xx", "or", "3xx", "responses:", n] => r.non_2xx = n.parse().context("non-2xx count")?,
            ["Socket", "errors:", rest @ ..] => {
                r.socket_errors = rest.iter().filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok()).sum();
            }
            _ => {}
        }
    }
    anyhow::ensure!(r.requests > 0, "no request count");
    Ok(r)
}

/// A `wrk` duration (`812.00us`, `1.23ms`, `1.05s`, `2.00m`) in ms.
fn ms(v: &str) -> Option<f64> {
    let split = v.find(|c: char| c.is_ascii_alphabetic())?;
    let (n, unit) = v.split_at(split);
    let n: f64 = n.parse().ok()?;
    let factor = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        "m" => 60e3,
        _ => return None,
    };
    Some(round(n * factor, 3))
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 10s test @ http://127.0.0.1:4000/v1/sessions
  2 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     8.12ms    3.01ms  61.77ms   80.00%
    Req/Sec     3.98k   301.22     4.51k    71.00%
  Latency Distribution
     50%  812.00us
     75%    9.10ms
     90%   11.20ms
     99%    1.05s
  79210 requests in 10.00s, 21.06MB read
  Socket errors: connect 0, read 2, write 0, timeout 1
  Non-2xx or 3xx responses: 12
Requests/sec:   7918.12
Transfer/sec:      2.10MB
";

    #[test]
    fn reads_wrk_latency_report() {
        let r = parse(WRK).unwrap_or_default();
        assert_eq!((r.requests, r.non_2xx, r.socket_errors), (79_210, 12, 3));
        assert_eq!(r.latency_p50_ms, Some(0.812));
        assert_eq!(r.latency_p90_ms, Some(11.2));
        assert_eq!(r.latency_p99_ms, Some(1050.0));
    }

    #[test]
    fn the_script_sends_json_with_the_token() {
        let s = script();
        assert!(s.contains("wrk.method = \"POST\"") && s.contains(ADMIN_TOKEN) && s.contains("[steps=1]"), "{s}");
    }
}
