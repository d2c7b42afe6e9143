//! `agentfleet-bench`: step throughput and worker cost of a whole fleet on this machine.
//!
//! It starts a fleet the way the integration tests do — real RabbitMQ and Redis, worker processes
//! running the real worker CLI, an in-process dispatcher, the scripted model and the tool server —
//! submits `--sessions` sessions of `--steps` steps each (every step but the last is a model call
//! and one tool call) and measures, over the run:
//!
//! - steps per second, from the first submission until the last session ended;
//! - worker CPU per step (user + system time of the worker processes, from `/proc`);
//! - the workers' peak resident memory;
//! - the CPU of this process (dispatcher, model and tool servers) and of redis-server and RabbitMQ.
//!
//! Build and run it in release mode (see `docs/BENCHMARKS.md`):
//! `cargo build --release -p agentfleet-tests --bins && target/release/agentfleet-bench`.

use std::time::{Duration, Instant};

use agentfleet_tests::fleet::{FleetOptions, TestFleet};
use agentfleet_tests::model_server::Faults;
use anyhow::{Context as _, bail};
use clap::Parser;
use futures::StreamExt as _;
use serde_json::json;

/// Measures steps per second and worker CPU per step.
#[derive(Debug, Parser)]
#[command(name = "agentfleet-bench", about)]
struct Args {
    /// Sessions in the measured run.
    #[arg(long, default_value_t = 2_000)]
    sessions: u32,
    /// Steps per session.
    #[arg(long, default_value_t = 5)]
    steps: u32,
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Steps in flight per worker (`worker.concurrency`).
    #[arg(long, default_value_t = 256)]
    concurrency: u16,
    /// Sessions created at once through the HTTP API.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Sessions run first and not measured (connections, queues, caches).
    #[arg(long, default_value_t = 100)]
    warmup: u32,
    /// The scripted model's delay before each answer, in ms: with it, `--concurrency` steps can be
    /// waiting on the model at once, which measures memory per session in flight.
    #[arg(long, default_value_t = 0)]
    model_latency_ms: u64,
    /// Longest the measured run may take, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Print the result as one JSON object.
    #[arg(long)]
    json: bool,
}

/// CPU seconds (user + system) of a process so far, from `/proc/<pid>/stat`.
fn cpu_seconds(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return 0.0 };
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name and state.
    (ticks(11) + ticks(12)) / USER_HZ
}

/// The unit of `/proc/<pid>/stat` times: Linux reports them in USER_HZ, 100 on every mainstream
/// architecture whatever the kernel's own tick rate.
const USER_HZ: f64 = 100.0;

/// Peak resident memory of a process in MiB (`VmHWM`).
fn peak_rss_mib(pid: u32) -> f64 {
    let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) else { return 0.0 };
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kib| kib / 1024.0)
}

/// Pids of every process whose command name is `name`.
fn pids_named(name: &str) -> Vec<u32> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == name))
        .collect()
}

/// CPU seconds of a group of processes.
#[derive(Clone)]
struct Group {
    pids: Vec<u32>,
}

impl Group {
    fn cpu(&self) -> f64 {
        self.pids.iter().map(|p| cpu_seconds(*p)).sum()
    }
}

struct Run {
    /// Until every session was created.
    submit: Duration,
    wall: Duration,
    steps: u64,
    sessions: u32,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let fleet = TestFleet::start(FleetOptions {
        workers: args.workers,
        concurrency: args.concurrency,
        lease_ms: 30_000,
        max_steps: args.steps + 5,
        ..Default::default()
    })
    .await?;
    fleet.model.set_faults(Faults { latency_ms: args.model_latency_ms, ..Default::default() });
    let outcome = measure(&fleet, &args).await;
    fleet.cleanup().await?;
    outcome
}

async fn measure(fleet: &TestFleet, args: &Args) -> anyhow::Result<()> {
    fleet.wait_ready(Duration::from_secs(30)).await?;
    if args.warmup > 0 {
        run_batch(fleet, args, args.warmup, "warmup").await?;
    }
    let workers = Group { pids: fleet.worker_pids() };
    let me = Group { pids: vec![std::process::id()] };
    let redis = Group { pids: pids_named("redis-server") };
    let rabbit = Group { pids: pids_named("beam.smp") };
    let before = [workers.cpu(), me.cpu(), redis.cpu(), rabbit.cpu()];
    let run = run_batch(fleet, args, args.sessions, "run").await?;
    let after = [workers.cpu(), me.cpu(), redis.cpu(), rabbit.cpu()];
    let used: Vec<f64> = after.iter().zip(before).map(|(a, b)| a - b).collect();
    let secs = run.wall.as_secs_f64();
    let rss: f64 = workers.pids.iter().map(|p| peak_rss_mib(*p)).fold(0.0, f64::max);
    let result = json!({
        "sessions": run.sessions,
        "steps_per_session": args.steps,
        "steps": run.steps,
        "workers": args.workers,
        "concurrency_per_worker": args.concurrency,
        "model_latency_ms": args.model_latency_ms,
        "wall_s": round(secs, 3),
        // With a model latency above this, every session was waiting on the model at once.
        "submit_s": round(run.submit.as_secs_f64(), 3),
        "steps_per_s": round(run.steps as f64 / secs, 0),
        "worker_cpu_us_per_step": round(used[0] * 1e6 / run.steps as f64, 0),
        "worker_cpu_cores": round(used[0] / secs, 2),
        "worker_peak_rss_mib": round(rss, 1),
        "bench_process_cpu_cores": round(used[1] / secs, 2),
        "redis_cpu_cores": round(used[2] / secs, 2),
        "rabbitmq_cpu_cores": round(used[3] / secs, 2),
    });
    if args.json {
        println!("{result}");
    } else {
        println!("{}", serde_json::to_string_pretty(&result)?);
    }
    Ok(())
}

fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Submits `n` sessions, waits until none is live, and checks that every one completed.
async fn run_batch(fleet: &TestFleet, args: &Args, n: u32, label: &str) -> anyhow::Result<Run> {
    let started = Instant::now();
    let body = json!({ "agent": "support", "input": format!("[steps={}] benchmark", args.steps) });
    let created: Vec<anyhow::Result<_>> =
        futures::stream::iter(0..n).map(|_| fleet.submit_json(&body)).buffer_unordered(args.submitters).collect().await;
    let ids = created.into_iter().collect::<anyhow::Result<Vec<_>>>().context("submitting")?;
    let submit = started.elapsed();
    let mut redis = fleet.redis().await?;
    let active = format!("{}:active", fleet.config.redis.key_prefix);
    let deadline = started + Duration::from_secs(args.timeout_s);
    loop {
        let live: u64 = redis::cmd("ZCARD").arg(&active).query_async(&mut redis).await?;
        if live == 0 {
            break;
        }
        if Instant::now() > deadline {
            bail!("{label}: {live} sessions still live after {} s", args.timeout_s);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let wall = started.elapsed();
    let mut steps = 0;
    for id in &ids {
        let status: Vec<Option<String>> = redis::cmd("HMGET")
            .arg(format!("{}:{{{id}}}:meta", fleet.config.redis.key_prefix))
            .arg("status")
            .arg("step")
            .query_async(&mut redis)
            .await?;
        if status.first().cloned().flatten().as_deref() != Some("completed") {
            bail!("{label}: session {id} ended {:?}, not completed", status.first());
        }
        steps += status.get(1).cloned().flatten().and_then(|s| s.parse::<u64>().ok()).unwrap_or(0);
    }
    Ok(Run { submit, wall, steps, sessions: n })
}
