//! `agentfleet eval SUITE`: every case of a suite through a real fleet, each judged against its
//! expectations, with a report for people, JSON for tools and JUnit XML for CI.
//!
//! With `--config`, the eval starts its own fleet — the real dispatcher and workers — from that
//! agent config, and puts its proxy between the workers and the model API, which makes `--record`
//! and `--replay` possible ([`proxy`]). Without it, the cases run on the fleet at `--url`.

mod fleet;
mod proxy;
mod report;
mod run;
mod suite;
mod verdict;

use std::path::{Path, PathBuf};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::Exit;
use crate::api::Api;
use crate::args::Eval;
use crate::output::Output;

/// Runs the suite and reports; fails (exit 1) when a case fails.
///
/// `api` is the fleet at `url`, used when there is no `--config`.
pub(crate) async fn run(api: Api, url: &str, out: Output, e: &Eval) -> anyhow::Result<Exit> {
    let mut suite = suite::load(&e.suite, e.agent.as_deref())?;
    if let Some(filter) = &e.filter {
        suite.cases.retain(|c| c.id.contains(filter.as_str()) || c.tags.iter().any(|t| t == filter));
        if suite.cases.is_empty() {
            bail!("--filter {filter}: no case has it in its id or tags");
        }
    }
    if e.config.is_none() && (e.record.is_some() || e.replay.is_some()) {
        bail!(
            "--record and --replay need --config: the eval then starts its own fleet, with its proxy in front of the model API"
        );
    }
    let shutdown = CancellationToken::new();
    let outcome = match &e.config {
        Some(config) => own_fleet(e, config, &suite, &shutdown).await,
        None => {
            let note = format!("the fleet at {url}, with whatever model it is configured for");
            Ok(("fleet".to_owned(), note, judge_all(&api, &suite, e.concurrency.into(), None, false).await))
        }
    };
    shutdown.cancel();
    let (model, note, verdicts) = outcome?;
    let report = report::Report::new(suite.name.clone(), model, note, verdicts);
    let document = serde_json::to_value(&report)?;
    if let Some(path) = &e.out {
        write(path, &serde_json::to_vec_pretty(&document)?)?;
    }
    if let Some(path) = &e.junit {
        write(path, report.junit()?.as_bytes())?;
    }
    let comparison = match &e.baseline {
        Some(path) => Some((path, report::compare(&report::read_baseline(path)?, &report))),
        None => None,
    };
    if out.json {
        let mut document = document;
        if let Some((_, cmp)) = &comparison {
            document["baseline"] = serde_json::to_value(cmp)?;
        }
        println!("{}", serde_json::to_string_pretty(&document)?);
    } else {
        print!("{}", report.table());
        if let Some((path, cmp)) = &comparison {
            print!("{}", cmp.text(path, &report));
        }
    }
    Ok(if report.summary.failed == 0 { Exit::Success } else { Exit::NotCompleted })
}

/// Starts the proxy and the fleet, runs the cases, stops the fleet.
async fn own_fleet(
    e: &Eval,
    config: &Path,
    suite: &suite::Suite,
    shutdown: &CancellationToken,
) -> anyhow::Result<(String, String, Vec<verdict::Verdict>)> {
    let run_dir =
        std::env::temp_dir().join(format!("agentfleet-eval-{}", ulid::Ulid::new().to_string().to_lowercase()));
    std::fs::create_dir_all(&run_dir).with_context(|| format!("cannot create {}", run_dir.display()))?;
    let upstream = fleet::upstream_model_url(config)?;
    let has_key = std::env::var("ANTHROPIC_API_KEY").is_ok_and(|k| !k.is_empty());
    let (mode, model, note) = match (&e.record, &e.replay) {
        (_, Some(dir)) => (
            proxy::Mode::Replay { dir: dir.clone() },
            "replay",
            format!(
                "model answers replayed from {} (no model calls; costs are what the recorded answers report)",
                dir.display()
            ),
        ),
        (record, None) => {
            if let Some(dir) = record {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("--record {}: cannot create it", dir.display()))?;
            }
            let (model, note) = if has_key {
                ("api", format!("the model API at {upstream}: these verdicts are the model's decisions"))
            } else {
                (
                    "scripted",
                    format!(
                        "no ANTHROPIC_API_KEY, so the model at {upstream} is a scripted server: these verdicts check \
                         the harness and the fleet's guarantees (budgets, escalations, approvals, tool errors), \
                         not the quality of a model's decisions"
                    ),
                )
            };
            let mode = match record {
                Some(dir) => proxy::Mode::Record { upstream: upstream.clone(), dir: dir.clone() },
                None => proxy::Mode::Pass { upstream: upstream.clone() },
            };
            (mode, model, note)
        }
    };
    let proxy = proxy::Proxy::start(mode, shutdown.clone()).await?;
    let bin_dir = fleet::bin_dir(e.bin_dir.as_deref())?;
    let spec = fleet::FleetSpec {
        config,
        bin_dir: &bin_dir,
        workers: e.workers.into(),
        prefix: &e.prefix,
        model_url: &proxy.url,
        run_dir: &run_dir,
    };
    let mut fleet = fleet::Fleet::start(&spec).await?;
    let api = Api::new(&fleet.url, Some(&fleet.token))?;
    let verdicts = judge_all(&api, suite, e.concurrency.into(), Some(&proxy), e.record.is_some()).await;
    let alive = fleet.check_alive();
    fleet.stop().await;
    alive?;
    if e.replay.is_some() {
        let missing: Vec<&str> = suite
            .cases
            .iter()
            .filter(|c| !proxy.has_recording(&proxy::case_key(&c.input.to_json())))
            .map(|c| c.id.as_str())
            .collect();
        if !missing.is_empty() {
            eprintln!("note: no recording for {} case(s): {}", missing.len(), missing.join(", "));
        }
    }
    Ok((model.to_owned(), note, verdicts))
}

/// Runs every case, `concurrency` at a time, with a progress bar on a terminal.
async fn judge_all(
    api: &Api,
    suite: &suite::Suite,
    concurrency: usize,
    proxy: Option<&proxy::Proxy>,
    record: bool,
) -> Vec<verdict::Verdict> {
    let bar = indicatif::ProgressBar::new(suite.cases.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:40} {pos}/{len} cases, {elapsed} {msg}")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    let verdicts = futures::stream::iter(&suite.cases)
        .map(|case| {
            let bar = bar.clone();
            async move {
                let ran = run::run_case(api, case).await;
                let key = proxy::case_key(&case.input.to_json());
                let mismatches = proxy.map(|p| p.mismatches(&key)).unwrap_or_default();
                let mut verdict = verdict::judge(case, &ran, mismatches);
                if record
                    && let Some(p) = proxy
                    && let Err(e) = p.save(&case.id, &key)
                {
                    verdict.passed = false;
                    verdict.failures.push(format!("the recording was not saved: {e:#}"));
                }
                if !verdict.passed {
                    bar.set_message(format!("{} failed", case.id));
                }
                bar.inc(1);
                verdict
            }
        })
        .buffered(concurrency.max(1))
        .collect::<Vec<_>>()
        .await;
    bar.finish_and_clear();
    verdicts
}

fn write(path: &PathBuf, bytes: &[u8]) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    std::fs::write(path, bytes).with_context(|| format!("cannot write {}", path.display()))
}
