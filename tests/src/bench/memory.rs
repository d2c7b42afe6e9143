//! Sessions in flight: many sessions waiting on a slow model in one worker, and what they cost it
//! in memory and in connections to the model.
//!
//! Every session is submitted at once; while they run, a sampler reads the live sessions, the
//! model's answers, the worker's resident memory and the TCP connections to the model server.
//! Throughput is read on the plateau, while the live sessions stay near their peak, and set
//! against what that many sessions in flight would give if only the model's latency held them:
//! in-flight ÷ latency.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::load::{Load, Shape};
use super::probe::{REQUEST_COUNTERS, Snapshot, model_counters, set_model_faults};
use super::{Bench, FleetSetup, procfs, round};

/// How often the sampler looks.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// The share of the peak that counts as the plateau.
const PLATEAU: f64 = 0.95;

/// What to run.
#[derive(Debug, Clone)]
pub struct MemoryOptions {
    /// The fleet (one worker, with a `concurrency` as large as the sessions).
    pub setup: FleetSetup,
    /// The sessions.
    pub shape: Shape,
    /// How many.
    pub sessions: u64,
    /// Sessions being submitted at once, at most.
    pub submitters: usize,
    /// The model's delay before each answer.
    pub model_latency: Duration,
    /// Longest wait for the sessions to end.
    pub drain_timeout: Duration,
}

/// The figures of a run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MemoryResult {
    /// Sessions.
    pub sessions: u64,
    /// Steps per session.
    pub steps_per_session: u32,
    /// Filler bytes in each first message.
    pub pad_bytes: usize,
    /// Steps in flight per worker.
    pub concurrency: u16,
    /// The model's latency, in ms.
    pub model_latency_ms: u64,
    /// Mean body bytes of a model request.
    pub avg_request_bytes: f64,
    /// The worker's peak resident memory (`VmHWM`), in MiB.
    pub worker_peak_rss_mib: f64,
    /// The most sessions live at once.
    pub peak_live: u64,
    /// Steps/s while the live sessions stayed within 5 % of their peak.
    pub plateau_steps_per_s: f64,
    /// How long that lasted, in seconds.
    pub plateau_s: f64,
    /// Peak live ÷ model latency: the steps/s if only the model held the sessions.
    pub expected_steps_per_s: f64,
    /// The most TCP connections to the model server seen at once (`/proc/net/tcp`).
    pub peak_model_connections: usize,
    /// What the model server itself reports about connections, when it does.
    pub model_server_connections: BTreeMap<String, u64>,
    /// Time to submit every session, in seconds.
    pub submit_s: f64,
    /// Time until the last session ended, in seconds.
    pub wall_s: f64,
    /// CPU seconds of the worker over the run.
    pub worker_cpu_s: f64,
    /// How busy the machine was over the run.
    pub busy: procfs::Busy,
}

/// One look of the sampler.
#[derive(Debug, Clone, Copy)]
struct Sample {
    at: Instant,
    live: u64,
    answered: u64,
    connections: usize,
}

/// Runs it on a fresh fleet; the model's latency is set for the run and cleared after.
pub async fn run(o: &MemoryOptions) -> anyhow::Result<MemoryResult> {
    let bench = Bench::start(&o.setup, o.shape.max_steps()).await?;
    let latency = serde_json::json!({ "latency_ms": o.model_latency.as_millis() as u64 });
    set_model_faults(&bench.model_url, &latency).await?;
    let outcome = measure(&bench, o).await;
    let cleared = set_model_faults(&bench.model_url, &serde_json::json!({})).await;
    bench.cleanup().await?;
    let result = outcome?;
    cleared?;
    Ok(result)
}

async fn measure(bench: &Bench, o: &MemoryOptions) -> anyhow::Result<MemoryResult> {
    let load = Load::new(&bench.fleet, o.shape).await?;
    let before = Snapshot::take(&bench.fleet.config.redis.url, &bench.model_url, false).await?;
    let stop = CancellationToken::new();
    let sampler = tokio::spawn(sample(load.clone(), bench.model_url.clone(), stop.clone()));
    let workers = bench.fleet.worker_pids();
    let cpu_before: f64 = workers.iter().map(|p| procfs::cpu_seconds(*p)).sum();
    let groups = bench.cpu_groups();
    let groups_before = groups.cpu();
    let started = Instant::now();
    let submitted = load.all_at_once(o.sessions, o.submitters).await;
    let submit_s = started.elapsed().as_secs_f64();
    let drained = match submitted {
        Ok(()) => load.drain(o.drain_timeout).await,
        Err(e) => Err(e),
    };
    let wall_s = started.elapsed().as_secs_f64();
    let busy = procfs::Busy::between(&groups_before, &groups.cpu(), wall_s);
    stop.cancel();
    let samples = sampler.await??;
    drained?;
    let after = Snapshot::take(&bench.fleet.config.redis.url, &bench.model_url, false).await?;
    load.check_completed(&bench.fleet).await?;
    let delta = before.until(&after);
    let requests = delta.model("requests_total").max(1) as f64;
    let peak_live = samples.iter().map(|s| s.live).max().unwrap_or(0);
    let (plateau_steps_per_s, plateau_s) = plateau(&samples);
    Ok(MemoryResult {
        sessions: o.sessions,
        steps_per_session: o.shape.steps,
        pad_bytes: o.shape.pad_bytes,
        concurrency: o.setup.concurrency,
        model_latency_ms: o.model_latency.as_millis() as u64,
        avg_request_bytes: round(delta.model("request_bytes_total") as f64 / requests, 0),
        worker_peak_rss_mib: round(workers.iter().map(|p| procfs::peak_rss_mib(*p)).fold(0.0, f64::max), 1),
        peak_live,
        plateau_steps_per_s: round(plateau_steps_per_s, 0),
        plateau_s: round(plateau_s, 1),
        expected_steps_per_s: round(peak_live as f64 / o.model_latency.as_secs_f64().max(1e-3), 0),
        peak_model_connections: samples.iter().map(|s| s.connections).max().unwrap_or(0),
        model_server_connections: after
            .model
            .into_iter()
            .filter(|(k, _)| !REQUEST_COUNTERS.contains(&k.as_str()))
            .collect(),
        submit_s: round(submit_s, 2),
        wall_s: round(wall_s, 2),
        worker_cpu_s: round(workers.iter().map(|p| procfs::cpu_seconds(*p)).sum::<f64>() - cpu_before, 2),
        busy,
    })
}

/// Samples until `stop`.
async fn sample(load: Load, model_url: String, stop: CancellationToken) -> anyhow::Result<Vec<Sample>> {
    let port = reqwest::Url::parse(&model_url)?.port_or_known_default().unwrap_or(80);
    let mut samples = Vec::new();
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(samples),
            _ = tick.tick() => {}
        }
        let answered = model_counters(&model_url).await?.get("answered_total").copied().unwrap_or(0);
        let live = load.live().count().await?;
        samples.push(Sample { at: Instant::now(), live, answered, connections: procfs::connections_to(port) });
    }
}

/// Steps/s between the first and the last sample with the live sessions within [`PLATEAU`] of
/// their peak, and how long that was.
fn plateau(samples: &[Sample]) -> (f64, f64) {
    let peak = samples.iter().map(|s| s.live).max().unwrap_or(0) as f64;
    let on: Vec<&Sample> = samples.iter().filter(|s| s.live as f64 >= PLATEAU * peak).collect();
    let (Some(first), Some(last)) = (on.first(), on.last()) else { return (0.0, 0.0) };
    let secs = last.at.duration_since(first.at).as_secs_f64();
    if secs <= 0.0 {
        return (0.0, 0.0);
    }
    (last.answered.saturating_sub(first.answered) as f64 / secs, secs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plateau_is_where_the_live_sessions_stay_near_their_peak() {
        let t0 = Instant::now();
        let at = |s: u64, live: u64, answered: u64| Sample {
            at: t0 + Duration::from_secs(s),
            live,
            answered,
            connections: 0,
        };
        let samples = [at(0, 100, 0), at(1, 960, 100), at(2, 1000, 600), at(3, 990, 1100), at(4, 200, 1500)];
        let (rate, secs) = plateau(&samples);
        assert_eq!(secs, 2.0);
        assert_eq!(rate, 500.0);
    }
}
