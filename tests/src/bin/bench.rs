//! `agentfleet-bench`: the figures of docs/BENCHMARKS.md, one run at a time. `scripts/bench.sh`
//! runs them all, with the reference before each, and prints the summary.
//!
//! - `steps`: steps/s and the cost of a step (worker CPU, Redis, RabbitMQ), then the overhead at
//!   half load;
//! - `memory`: sessions in flight against a slow model;
//! - `intake`: sessions created per second over HTTP, by `wrk`;
//! - `reference`: the bare step protocol, measured the same way;
//! - `report`: the summary of a folder of results.
//!
//! Build and run it in release mode: `cargo build --release -p agentfleet-tests --bins`.

use std::path::PathBuf;
use std::time::Duration;

use agentfleet_tests::bench::intake::{self, IntakeOptions};
use agentfleet_tests::bench::load::Shape;
use agentfleet_tests::bench::memory::{self, MemoryOptions};
use agentfleet_tests::bench::reference::{self, ReferenceOptions};
use agentfleet_tests::bench::report::{Machine, Summary};
use agentfleet_tests::bench::steps::{self, StepsOptions};
use agentfleet_tests::bench::{FleetSetup, cache};
use agentfleet_tests::fleet::redis_url;
use anyhow::Context as _;
use clap::{Args, Parser, Subcommand};

/// mimalloc, as in the shipped binaries: this process runs the dispatcher.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// The fleet's benchmarks (docs/BENCHMARKS.md).
#[derive(Debug, Parser)]
#[command(name = "agentfleet-bench", about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Steps/s and the cost of a step with a fixed number of sessions live, then the
    /// orchestration overhead at half that load, then Redis round trips under MONITOR.
    Steps(StepsArgs),
    /// Many sessions waiting on a slow model in one worker: memory, throughput, connections.
    Memory(MemoryArgs),
    /// Sessions created per second over HTTP, measured by wrk against the dispatcher.
    Intake(IntakeArgs),
    /// The bare step protocol (steploop-proto), with the same counters read around it.
    Reference(ReferenceArgs),
    /// The summary of a folder of results, as markdown (printed) and JSON.
    Report(ReportArgs),
    /// Dollars per session with prompt caching `auto` and `off`, on the same sessions.
    Cache(CacheArgs),
}

/// `cache`: the same sessions with prompt caching on and off.
#[derive(Debug, Args)]
struct CacheArgs {
    /// Sessions per `[steps=12]` workload.
    #[arg(long, default_value_t = 40)]
    sessions: u64,
    /// Sessions of the demo's goals.
    #[arg(long, default_value_t = 24)]
    demo_sessions: u64,
    /// The demo's config, for its system prompt.
    #[arg(long, default_value = "deploy/local/agentfleet.toml")]
    demo_config: PathBuf,
    /// Worker processes (two, so that consecutive steps of a session run in different workers).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Write the result here as JSON (it is printed either way), and the table beside it (`.md`).
    #[arg(long)]
    out: Option<PathBuf>,
}

/// The fleet of a run.
#[derive(Debug, Args)]
struct FleetArgs {
    /// Worker processes.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// Steps in flight per worker (`worker.concurrency`).
    #[arg(long, default_value_t = 256)]
    concurrency: u16,
    /// A running model server (`agentfleet-model-server`); default: one in this process.
    #[arg(long)]
    model_url: Option<String>,
    /// A running tool server (`agentfleet-tool-server`); default: one in this process.
    #[arg(long)]
    tool_url: Option<String>,
    /// Write the result here as JSON (it is printed either way).
    #[arg(long)]
    out: Option<PathBuf>,
}

impl FleetArgs {
    fn setup(&self) -> FleetSetup {
        FleetSetup {
            workers: self.workers,
            concurrency: self.concurrency,
            model_url: self.model_url.clone(),
            tool_url: self.tool_url.clone(),
        }
    }
}

/// The sessions of a run.
#[derive(Debug, Args)]
struct ShapeArgs {
    /// Steps per session (their mean with --vary).
    #[arg(long, default_value_t = 5)]
    steps: u32,
    /// Sessions of 1..=2·steps−1 steps, spread as the reference's --vary spreads them.
    #[arg(long)]
    vary: bool,
    /// Filler bytes in each session's first message (a long conversation from the first step).
    #[arg(long, default_value_t = 0)]
    pad_bytes: usize,
}

impl ShapeArgs {
    fn shape(&self) -> Shape {
        Shape { steps: self.steps, vary: self.vary, pad_bytes: self.pad_bytes }
    }
}

#[derive(Debug, Args)]
struct StepsArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    shape: ShapeArgs,
    /// A name for the result (`3kb`, `10kb`).
    #[arg(long, default_value = "run")]
    label: String,
    /// Sessions kept live (a new one as one ends).
    #[arg(long, default_value_t = 1_000)]
    live: u64,
    /// Sessions being submitted at once, at most.
    #[arg(long, default_value_t = 64)]
    submitters: usize,
    /// Seconds before the measured window.
    #[arg(long, default_value_t = 5)]
    warmup_s: u64,
    /// Seconds of the measured window.
    #[arg(long, default_value_t = 15)]
    seconds: u64,
    /// Seconds of the overhead window at half load (0: skip it).
    #[arg(long, default_value_t = 10)]
    half_load_s: u64,
    /// Sessions of the Redis MONITOR census (0: skip it).
    #[arg(long, default_value_t = 100)]
    census_sessions: u64,
    /// Longest wait for the sessions to end, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
}

#[derive(Debug, Args)]
struct MemoryArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    #[command(flatten)]
    shape: ShapeArgs,
    /// Sessions, all submitted at once.
    #[arg(long, default_value_t = 10_000)]
    sessions: u64,
    /// Sessions being submitted at once, at most.
    #[arg(long, default_value_t = 128)]
    submitters: usize,
    /// The model's delay before each answer, in ms.
    #[arg(long, default_value_t = 2_000)]
    model_latency_ms: u64,
    /// Longest wait for the sessions to end, in seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

#[derive(Debug, Args)]
struct IntakeArgs {
    #[command(flatten)]
    fleet: FleetArgs,
    /// Seconds of load.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// wrk's connections.
    #[arg(long, default_value_t = 64)]
    connections: u32,
    /// wrk's threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
}

#[derive(Debug, Args)]
struct ReferenceArgs {
    /// The steploop-proto binary.
    #[arg(long)]
    binary: PathBuf,
    /// The model server both runs use.
    #[arg(long)]
    model_url: String,
    /// The tool server both runs use.
    #[arg(long)]
    tool_url: String,
    /// A name for the result (`3kb`, `10kb`).
    #[arg(long, default_value = "run")]
    label: String,
    /// Longest it may run, in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Write the result here as JSON (it is printed either way).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Its own arguments, after `--`.
    #[arg(last = true)]
    args: Vec<String>,
}

#[derive(Debug, Args)]
struct ReportArgs {
    /// The folder of results; summary.md and summary.json are written there.
    dir: PathBuf,
    /// The date of the run, as it should read.
    #[arg(long)]
    date: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // On SIGTERM (a bounded run's timeout) or SIGINT the run is dropped, and with it the fleet,
    // whose worker processes are killed on drop: none is left consuming.
    tokio::select! {
        done = run(cli.command) => done,
        () = agentfleet::shutdown::shutdown_signal() => anyhow::bail!("stopped by a signal"),
    }
}

async fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Steps(a) => {
            let o = StepsOptions {
                label: a.label.clone(),
                setup: a.fleet.setup(),
                shape: a.shape.shape(),
                live: a.live,
                submitters: a.submitters,
                warmup: Duration::from_secs(a.warmup_s),
                window: Duration::from_secs(a.seconds),
                half_load: Duration::from_secs(a.half_load_s),
                census_sessions: a.census_sessions,
                drain_timeout: Duration::from_secs(a.timeout_s),
            };
            emit(&steps::run(&o).await?, a.fleet.out.as_ref())
        }
        Command::Memory(a) => {
            let o = MemoryOptions {
                setup: a.fleet.setup(),
                shape: a.shape.shape(),
                sessions: a.sessions,
                submitters: a.submitters,
                model_latency: Duration::from_millis(a.model_latency_ms),
                drain_timeout: Duration::from_secs(a.timeout_s),
            };
            emit(&memory::run(&o).await?, a.fleet.out.as_ref())
        }
        Command::Intake(a) => {
            let o = IntakeOptions {
                duration: Duration::from_secs(a.seconds),
                connections: a.connections,
                threads: a.threads,
            };
            emit(&intake::run(&a.fleet.setup(), &o).await?, a.fleet.out.as_ref())
        }
        Command::Reference(a) => {
            let o = ReferenceOptions {
                label: a.label.clone(),
                binary: a.binary.clone(),
                args: a.args.clone(),
                model_url: a.model_url.clone(),
                tool_url: a.tool_url.clone(),
                redis_url: redis_url(),
                timeout: Duration::from_secs(a.timeout_s),
            };
            emit(&reference::run(&o).await?, a.out.as_ref())
        }
        Command::Report(a) => report(&a).await,
        Command::Cache(a) => {
            let o = cache::CacheOptions {
                sessions: a.sessions,
                demo_sessions: a.demo_sessions,
                demo_config: a.demo_config.clone(),
                workers: a.workers,
            };
            let result = cache::run(&o).await?;
            let table = cache::markdown(&result);
            println!("{table}");
            if let Some(out) = &a.out {
                std::fs::write(out.with_extension("md"), &table)?;
            }
            emit(&result, a.out.as_ref())
        }
    }
}

/// Prints `result` as JSON, and writes it to `out`.
fn emit(result: &impl serde::Serialize, out: Option<&PathBuf>) -> anyhow::Result<()> {
    let json = serde_json::to_string_pretty(result)?;
    if let Some(out) = out {
        std::fs::write(out, &json).with_context(|| format!("writing {}", out.display()))?;
    }
    println!("{json}");
    Ok(())
}

async fn report(a: &ReportArgs) -> anyhow::Result<()> {
    let date = match &a.date {
        Some(d) => d.clone(),
        None => String::from_utf8_lossy(&std::process::Command::new("date").output()?.stdout).trim().to_owned(),
    };
    let summary = Summary::read(&a.dir, Machine::here(date, &redis_url()).await)?;
    let md = summary.markdown();
    std::fs::write(a.dir.join("summary.md"), &md)?;
    std::fs::write(a.dir.join("summary.json"), serde_json::to_string_pretty(&summary)?)?;
    print!("{md}");
    Ok(())
}
