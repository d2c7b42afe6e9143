//! `agentfleet-chaos`: the chaos suite. See `docs/RELIABILITY.md` and [`agentfleet_tests::chaos`].
//!
//! It starts a private Redis (AOF on) and a private RabbitMQ node, a fleet of worker processes on
//! them (the real worker CLI, as `agentfleet-bench` does), runs a mix of sessions while it injects
//! faults, and prints one row per check with counts. Exit status: 0 when nothing broke, 1 on any
//! violation, 2 when the suite itself could not run.
//!
//! `--storm-only` runs the storm check instead: `--runs` times, `--sessions` sessions of `--steps`
//! steps while `--storm-rate` of the model's answers are 529; each run must end within
//! `--storm-limit-s`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use agentfleet_tests::chaos::checks::{self, Row};
use agentfleet_tests::chaos::run::{self, Rig, Services, Settings};
use anyhow::Context as _;
use clap::Parser;

/// Runs the fleet through faults and counts what held.
#[derive(Debug, Parser)]
#[command(name = "agentfleet-chaos", about)]
struct Args {
    /// Sessions in the run (a mix of short, long, escalating, approval, failing-tool and capped).
    #[arg(long, default_value_t = 500)]
    sessions: usize,
    /// Worker processes.
    #[arg(long, default_value_t = 4)]
    workers: usize,
    /// Steps in flight per worker.
    #[arg(long, default_value_t = 16)]
    concurrency: u16,
    /// The workers' lease, in ms.
    #[arg(long, default_value_t = 5_000)]
    lease_ms: u64,
    /// SIGKILLs of a random worker, each replaced at once.
    #[arg(long, default_value_t = 10)]
    kills: usize,
    /// SIGSTOPs of a worker (then SIGCONT).
    #[arg(long, default_value_t = 1)]
    sigstop: usize,
    /// How long a worker stays stopped, in s; 0: three leases, and at least 30 s (past the private
    /// broker's 10 s heartbeat, which closes a connection after two missed beats).
    #[arg(long, default_value_t = 0)]
    sigstop_s: u64,
    /// Restarts of the RabbitMQ node.
    #[arg(long, default_value_t = 1)]
    broker_restarts: usize,
    /// `kill -9` and restarts of Redis.
    #[arg(long, default_value_t = 1)]
    redis_restarts: usize,
    /// The share of model answers that are 529 during the storm (and in `--storm-only`).
    #[arg(long, default_value_t = 0.3)]
    storm_rate: f64,
    /// How long the storm lasts, in s.
    #[arg(long, default_value_t = 20)]
    storm_s: u64,
    /// Time between two disruptive faults, in ms.
    #[arg(long, default_value_t = 4_000)]
    fault_interval_ms: u64,
    /// The model's latency, in ms (with as much random jitter again).
    #[arg(long, default_value_t = 300)]
    model_latency_ms: u64,
    /// Malformed requests published to the requests queue; exactly these must be dead-lettered.
    #[arg(long, default_value_t = 5)]
    bad_inputs: usize,
    /// Seeds the workload and the choice of workers to kill.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The longest the sessions may take to end after the last fault, in s.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Use the machine's RabbitMQ (`AMQP_URL`) instead of a private node; it is never restarted.
    #[arg(long)]
    shared_broker: bool,
    /// The agents' `max_steps`.
    #[arg(long, default_value_t = 50)]
    max_steps: u32,
    /// The janitor's `stall_after_s`: a session standing still this long gets its step published
    /// again (the safety net for a step message lost with the broker). The production default is
    /// 300; 120 keeps a lost message from holding the run up for 5 minutes, and still waits out a
    /// postponement in the 2-minute delay tier (a duplicate would be harmless anyway).
    #[arg(long, default_value_t = 120)]
    stall_after_s: u64,
    /// Run the storm check instead of the chaos run.
    #[arg(long)]
    storm_only: bool,
    /// `--storm-only`: steps per session.
    #[arg(long, default_value_t = 5)]
    steps: u32,
    /// `--storm-only`: how many runs.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// `--storm-only`: the longest one run may take, in s.
    #[arg(long, default_value_t = 60)]
    storm_limit_s: u64,
    /// Keep the private services' files (logs, AOF) after the run.
    #[arg(long)]
    keep: bool,
}

impl Args {
    fn settings(&self) -> Settings {
        let sigstop_s = if self.sigstop_s > 0 { self.sigstop_s } else { (3 * self.lease_ms).div_ceil(1000).max(30) };
        Settings {
            sessions: self.sessions,
            workers: self.workers,
            concurrency: self.concurrency,
            lease_ms: self.lease_ms,
            kills: self.kills,
            sigstops: self.sigstop,
            sigstop_s,
            broker_restarts: self.broker_restarts,
            redis_restarts: self.redis_restarts,
            storm_rate: self.storm_rate,
            storm_s: self.storm_s,
            fault_interval_ms: self.fault_interval_ms,
            model_latency_ms: self.model_latency_ms,
            bad_inputs: self.bad_inputs,
            seed: self.seed,
            timeout_s: self.timeout_s,
            shared_broker: self.shared_broker,
            max_steps: self.max_steps,
            stall_after_s: self.stall_after_s,
        }
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    let command: Vec<String> = std::env::args().collect();
    println!("$ {}", command.join(" "));
    let dir = std::env::temp_dir().join(format!("agentfleet-chaos-{}", std::process::id()));
    // Dropping the suite's future (on a signal) drops the fleet and the services, whose `Drop`
    // kills every process they started.
    let outcome = tokio::select! {
        r = suite(&args, &dir) => r,
        () = agentfleet::shutdown::shutdown_signal() => Err(anyhow::anyhow!("interrupted")),
    };
    let code = match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("agentfleet-chaos: error: {e:#}");
            ExitCode::from(2)
        }
    };
    if args.keep || code != ExitCode::SUCCESS {
        println!("the private services' files are in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(&dir);
    }
    code
}

/// Runs the suite; true when nothing broke.
async fn suite(args: &Args, dir: &Path) -> anyhow::Result<bool> {
    let settings = args.settings();
    std::fs::create_dir_all(dir)?;
    let mut services = Services::start(dir, args.shared_broker).await?;
    let broker = services.rabbit.as_ref().map_or_else(
        || "the machine's RabbitMQ (--shared-broker: never restarted)".to_owned(),
        |r| format!("private RabbitMQ node {}", r.node()),
    );
    println!("services: private Redis {} (AOF everysec, noeviction); {broker}", services.redis.url());
    let result =
        if args.storm_only { storm(args, &settings, &services).await } else { chaos(&settings, &mut services).await };
    services.stop().await;
    result
}

async fn chaos(settings: &Settings, services: &mut Services) -> anyhow::Result<bool> {
    let mut rig = Rig::start(services, settings).await?;
    let logs: PathBuf = rig.fleet.log_dir().clone();
    println!(
        "fleet: {} workers x {} steps in flight, lease {} ms; worker logs in {}",
        settings.workers,
        settings.concurrency,
        settings.lease_ms,
        logs.display()
    );
    println!(
        "workload: {} sessions over ~{:.0} s of faults (seed {})",
        settings.sessions,
        run::schedule_length(settings).as_secs_f64(),
        settings.seed
    );
    let out = run::run_chaos(&mut rig, services, settings).await?;
    println!("\nfaults:");
    for line in &out.faults.lines {
        println!("  {line}");
    }
    println!(
        "\n{} sessions ended {:.1} s after the first submission; {} crashes (kills {}, SIGSTOPs {}, Redis restarts {}), {} broker restarts, storm {:.0} s",
        out.sessions.iter().flatten().filter(|s| run::is_final(s)).count(),
        out.wall.as_secs_f64(),
        out.faults.crashes(),
        out.faults.kills,
        out.faults.pauses,
        out.faults.redis_restarts,
        out.faults.broker_restarts,
        out.faults.storm_s,
    );
    print_slowest(&rig, &out).await;
    let rows = checks::check(&rig, &out, settings.bad_inputs).await.context("checking")?;
    print_table(&rows);
    let violations: u64 = rows.iter().map(|r| r.violations).sum();
    println!(
        "\n{}",
        if violations == 0 { "PASS: no violations".to_owned() } else { format!("FAIL: {violations} violations") }
    );
    drop(rig);
    Ok(violations == 0)
}

/// When the sessions ended (their trace's last record), and what the slowest ones waited for:
/// the longest pause in their trace.
async fn print_slowest(rig: &Rig, out: &run::Outcome) {
    let mut ended: Vec<(u64, usize, String)> = Vec::new();
    for (i, id) in out.ids.iter().enumerate() {
        let Some(id) = id else { continue };
        if let Ok((last_ms, pause)) = checks::trace_summary(rig, id).await {
            ended.push((last_ms.saturating_sub(out.started_ms), i, pause));
        }
    }
    ended.sort();
    let at = |q: f64| {
        let i = ((ended.len() as f64 * q) as usize).min(ended.len().saturating_sub(1));
        ended.get(i).map_or(f64::NAN, |e| e.0 as f64 / 1000.0)
    };
    println!(
        "sessions ended (since the first submission): p50 {:.1} s, p90 {:.1} s, last {:.1} s",
        at(0.5),
        at(0.9),
        at(1.0)
    );
    for (t, i, pause) in ended.iter().rev().take(3) {
        let p = &out.planned[*i];
        let id = out.ids[*i].as_ref().map_or("?", |id| id.as_str());
        println!("  #{} {} {id} ended at {:.1} s; {pause}", p.index, p.kind.name(), *t as f64 / 1000.0);
    }
}

fn print_table(rows: &[Row]) {
    let width = rows.iter().map(|r| r.check.len()).max().unwrap_or(10);
    println!("\n{:<width$}  {:>8}  {:>10}", "check", "checked", "violations");
    for r in rows {
        println!("{:<width$}  {:>8}  {:>10}", r.check, r.checked, r.violations);
        if !r.note.is_empty() {
            println!("{:<width$}  {}", "", r.note);
        }
        for e in &r.examples {
            println!("{:<width$}  ! {e}", "");
        }
    }
}

async fn storm(args: &Args, settings: &Settings, services: &Services) -> anyhow::Result<bool> {
    let limit = Duration::from_secs(args.storm_limit_s);
    let mut pass = true;
    println!(
        "storm: {} runs of {} sessions x {} steps, {:.0}% of model answers 529, {} workers; limit {} s per run",
        args.runs,
        args.sessions,
        args.steps,
        args.storm_rate * 100.0,
        args.workers,
        args.storm_limit_s
    );
    for run in 1..=args.runs {
        let rig = Rig::start(services, settings).await?;
        // Past the limit the run has failed; give it twice as long to say how long it took.
        let (took, completed) = run::run_storm(&rig, args.sessions, args.steps, args.storm_rate, limit * 2).await?;
        let stats = rig.fleet.model.stats();
        let ok = took <= limit && completed == args.sessions;
        pass &= ok;
        println!(
            "run {run}: {:.1} s, {completed}/{} completed, {} model answers, {} injected 529: {}",
            took.as_secs_f64(),
            args.sessions,
            stats.answered_total,
            stats.injected.r529,
            if ok { "ok" } else { "FAIL" }
        );
        rig.fleet.cleanup().await?;
    }
    println!("\n{}", if pass { "PASS" } else { "FAIL" });
    Ok(pass)
}
