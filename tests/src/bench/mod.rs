//! The benchmark behind `agentfleet-bench` and `scripts/bench.sh` (docs/BENCHMARKS.md).
//!
//! Each run starts a fleet the way the integration tests do (real RabbitMQ and Redis, worker
//! processes running the real worker CLI, an in-process dispatcher), points it at the model and
//! tool servers it is given, and writes one JSON result:
//!
//! - [`steps`]: steps/s and the cost of a step (worker CPU, Redis calls and bytes, RabbitMQ
//!   messages), then the orchestration overhead at half that load;
//! - [`memory`]: thousands of sessions waiting on a slow model in one worker;
//! - [`intake`]: sessions created per second over HTTP, measured by `wrk`;
//! - [`reference`]: the bare step protocol (`../shared/bench/steploop-proto`), run against the same
//!   servers and measured the same way.
//!
//! [`report`] puts the results of one run side by side with the targets.

pub mod cache;
pub mod census;
pub mod histogram;
pub mod intake;
pub mod load;
pub mod memory;
pub mod probe;
pub mod procfs;
pub mod reference;
pub mod report;
pub mod steps;

use std::time::Duration;

use crate::fleet::{FleetOptions, TestFleet};

/// How to start the fleet of a run.
#[derive(Debug, Clone)]
pub struct FleetSetup {
    /// Worker processes.
    pub workers: usize,
    /// Steps in flight per worker (`worker.concurrency`).
    pub concurrency: u16,
    /// The model server; `None` runs the fleet's own, in process.
    pub model_url: Option<String>,
    /// The tool server; `None` runs the fleet's own, in process.
    pub tool_url: Option<String>,
}

/// A started fleet and the model server it calls.
pub struct Bench {
    /// The fleet.
    pub fleet: TestFleet,
    /// The base URL of the model server the fleet calls.
    pub model_url: String,
}

impl Bench {
    /// Starts the fleet of `setup` for sessions of up to `max_steps` steps, and waits until its
    /// dispatcher is ready.
    pub async fn start(setup: &FleetSetup, max_steps: u32) -> anyhow::Result<Self> {
        let fleet = TestFleet::start(FleetOptions {
            workers: setup.workers,
            concurrency: setup.concurrency,
            lease_ms: 30_000,
            max_steps: max_steps + 5,
            model_url: setup.model_url.clone(),
            tool_url: setup.tool_url.clone(),
            ..Default::default()
        })
        .await?;
        fleet.wait_ready(Duration::from_secs(30)).await?;
        let model_url = setup.model_url.clone().unwrap_or_else(|| fleet.model.base_url());
        Ok(Self { fleet, model_url })
    }

    /// The worker processes, the broker, Redis, the servers and this process (the dispatcher),
    /// whose CPU a run reports.
    pub fn cpu_groups(&self) -> procfs::Groups {
        procfs::Groups::default()
            .with(WORKER, self.fleet.worker_pids())
            .with(BENCH_PROCESS, vec![std::process::id()])
            .with_named("redis-server", "redis-server")
            .with_named("rabbitmq", "beam.smp")
            .with_named("model server", "agentfleet-mode")
            .with_named("tool server", "agentfleet-tool")
    }

    /// The sum of every worker's `/metrics` histogram `name` (cumulative buckets).
    pub async fn worker_histogram(&self, name: &str) -> anyhow::Result<Vec<(f64, u64)>> {
        let mut sum: Vec<(f64, u64)> = Vec::new();
        for i in self.fleet.live_workers() {
            let Some(url) = self.fleet.worker_metrics_url(i) else { continue };
            let text = self.fleet.http.get(&url).send().await?.error_for_status()?.text().await?;
            for (le, n) in histogram::buckets(&text, name) {
                match sum.iter_mut().find(|(b, _)| *b == le) {
                    Some((_, c)) => *c += n,
                    None => sum.push((le, n)),
                }
            }
        }
        sum.sort_by(|a, b| a.0.total_cmp(&b.0));
        Ok(sum)
    }

    /// Stops the fleet and deletes its queues and keys.
    pub async fn cleanup(self) -> anyhow::Result<()> {
        self.fleet.cleanup().await
    }
}

/// The worker group's name in [`Bench::cpu_groups`].
pub const WORKER: &str = "worker";

/// This process's group in [`Bench::cpu_groups`]: the dispatcher, and the load it is given.
pub const BENCH_PROCESS: &str = "bench (dispatcher)";

/// Rounds `x` to `digits` decimals (for results meant to be read).
pub fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}
