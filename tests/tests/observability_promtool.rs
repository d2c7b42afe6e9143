//! The metrics both binaries serve pass `promtool check metrics`, the alerting rules pass
//! `promtool check rules`, and every metric the Grafana dashboard queries is one the fleet exports.
//!
//! promtool comes from Debian's `prometheus` package, which `scripts/test.sh` installs; without it
//! the test fails and says so.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, try_eventually};
use futures::future::try_join_all;
use serde_json::{Value, json};

/// The panels operators of the fleet look at (matched by title).
const REQUIRED_PANELS: [&str; 14] = [
    "Session success rate",
    "Average steps per session",
    "Cost per session (USD)",
    "Cost per hour (USD)",
    "Most-used tools",
    "Tool errors by tool",
    "Throughput (steps/s)",
    "Step latency p50/p95/p99",
    "Orchestration overhead p50/p95/p99",
    "Breaker states",
    "Queue depth",
    "Budget exhaustions",
    "Prompt cache hit ratio",
    "Escalations waiting",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("tests/ has a parent").to_path_buf()
}

fn on_path(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn output_text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

/// Fails the test, naming the fix, when `promtool` is not on PATH (`bash scripts/test.sh` installs it).
fn ensure_promtool() {
    assert!(
        on_path("promtool"),
        "promtool is not on PATH: install Debian's `prometheus` package (`apt-get install -y prometheus`), \
         which `bash scripts/test.sh` does"
    );
}

/// Runs `promtool args…` with `stdin` (a file) as its input; returns (success, output).
fn promtool(args: &[&str], stdin: Option<&Path>) -> (bool, String) {
    ensure_promtool();
    let mut cmd = Command::new("promtool");
    cmd.args(args);
    match stdin {
        Some(p) => cmd.stdin(std::fs::File::open(p).expect("opening promtool input")),
        None => cmd.stdin(Stdio::null()),
    };
    let out = cmd.output().expect("running promtool");
    (out.status.success(), output_text(&out))
}

/// Every `agentfleet_…` metric name in `text` (not the middle of a recording rule's `a:b:c` name).
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut from = 0;
    while let Some(at) = text[from..].find("agentfleet_") {
        let start = from + at;
        let mut end = start + "agentfleet_".len();
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let inside_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || matches!(bytes[start - 1], b'_' | b':'));
        if !inside_word && end > start + "agentfleet_".len() {
            names.insert(text[start..end].to_owned());
        }
        from = end;
    }
    names
}

/// An exposition: metric family → type, and the families with at least one sample.
#[derive(Default)]
struct Exposition {
    types: BTreeMap<String, String>,
    with_samples: BTreeSet<String>,
}

impl Exposition {
    fn add(&mut self, text: &str) {
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let mut parts = rest.split_whitespace();
                if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                    self.types.insert(name.to_owned(), kind.to_owned());
                }
            }
        }
        for line in text.lines().filter(|l| !l.starts_with('#') && !l.trim().is_empty()) {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = self.family(name);
            self.with_samples.insert(family);
        }
    }

    /// The family of a series name: `x_bucket`, `x_sum`, `x_count` of a histogram (or summary) `x`.
    fn family(&self, name: &str) -> String {
        for suffix in ["_bucket", "_sum", "_count"] {
            if let Some(base) = name.strip_suffix(suffix)
                && matches!(self.types.get(base).map(String::as_str), Some("histogram" | "summary"))
            {
                return base.to_owned();
            }
        }
        name.to_owned()
    }
}

/// The metric names of the `HELP` table in telemetry.rs.
fn defined_metrics() -> BTreeSet<String> {
    let src = std::fs::read_to_string(repo_root().join("shared/src/telemetry.rs")).expect("reading telemetry.rs");
    let table =
        src.split("const HELP").nth(1).and_then(|t| t.split("];").next()).expect("telemetry.rs has a HELP table");
    table
        .lines()
        .filter_map(|l| l.trim().strip_prefix("(\""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_owned)
        .collect()
}

async fn scrape(http: &reqwest::Client, url: &str) -> anyhow::Result<String> {
    let r = http.get(url).send().await?;
    anyhow::ensure!(r.status().is_success(), "GET {url} answered {}", r.status());
    Ok(r.text().await?)
}

fn write_temp(name: &str, text: &str) -> PathBuf {
    let path = std::env::temp_dir().join(format!("agentfleet-promtool-{}-{name}", std::process::id()));
    std::fs::write(&path, text).expect("writing temp file");
    path
}

fn check_metrics(what: &str, text: &str) {
    let file = write_temp(&format!("{what}.prom"), text);
    let (ok, out) = promtool(&["check", "metrics"], Some(&file));
    println!(
        "promtool check metrics ({what}, {} lines): {}",
        text.lines().count(),
        if out.trim().is_empty() { "no findings" } else { out.trim() }
    );
    let _ = std::fs::remove_file(&file);
    assert!(ok, "promtool check metrics failed on the {what}'s /metrics:\n{out}\n--- exposition ---\n{text}");
}

#[test]
fn the_alerting_rules_pass_promtool() {
    let rules = repo_root().join("deploy/prometheus/rules.yml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().expect("utf-8 path")], None);
    println!("promtool check rules: {}", out.trim());
    assert!(ok, "promtool check rules failed:\n{out}");
    // Every metric the rules use is one telemetry.rs defines.
    let text = std::fs::read_to_string(&rules).expect("reading rules.yml");
    let defined = defined_metrics();
    let unknown: Vec<_> = metric_names(&text).into_iter().filter(|n| !defined.contains(n)).collect();
    assert!(unknown.is_empty(), "rules.yml uses metrics telemetry.rs does not define: {unknown:?}");
    for alert in [
        "AgentfleetBudgetAlertRateHigh",
        "AgentfleetBreakerOpen",
        "AgentfleetDeadLetterQueueGrowing",
        "AgentfleetStepsQueuedWithoutConsumers",
        "AgentfleetSessionSuccessRateLow",
    ] {
        assert!(text.contains(&format!("alert: {alert}")), "rules.yml has no {alert}");
    }
}

/// Every target expression of the dashboard, by panel title (rows' nested panels included).
fn dashboard_exprs(dash: &Value) -> Vec<(String, String)> {
    fn walk(panels: &[Value], out: &mut Vec<(String, String)>) {
        for p in panels {
            let title = p["title"].as_str().unwrap_or_default().to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(e) = t["expr"].as_str() {
                    out.push((title.clone(), e.to_owned()));
                }
            }
            walk(p["panels"].as_array().map_or(&[][..], Vec::as_slice), out);
        }
    }
    let mut out = Vec::new();
    walk(dash["panels"].as_array().map_or(&[][..], Vec::as_slice), &mut out);
    out
}

fn check_dashboard_shape(dash: &Value) {
    assert!(dash["schemaVersion"].as_u64().is_some_and(|v| v >= 36), "schemaVersion {}", dash["schemaVersion"]);
    let vars = dash["templating"]["list"].as_array().expect("templating.list");
    assert!(
        vars.iter().any(|v| v["name"] == "DS_PROMETHEUS" && v["type"] == "datasource" && v["query"] == "prometheus"),
        "no DS_PROMETHEUS datasource variable"
    );
    let panels = dash["panels"].as_array().expect("panels");
    let mut ids = BTreeSet::new();
    for p in panels {
        assert!(ids.insert(p["id"].as_u64().expect("panel id")), "duplicate panel id {}", p["id"]);
        if p["type"] == "row" {
            continue;
        }
        assert_eq!(p["datasource"]["uid"], "${DS_PROMETHEUS}", "panel {} datasource", p["title"]);
        let targets = p["targets"].as_array().filter(|t| !t.is_empty());
        assert!(targets.is_some(), "panel {} has no targets", p["title"]);
        for t in targets.into_iter().flatten() {
            assert!(
                t["expr"].as_str().is_some_and(|e| !e.is_empty()),
                "panel {} has a target without expr",
                p["title"]
            );
        }
    }
    let titles: BTreeSet<&str> = panels.iter().filter_map(|p| p["title"].as_str()).collect();
    let missing: Vec<_> = REQUIRED_PANELS.iter().filter(|t| !titles.contains(*t)).collect();
    assert!(missing.is_empty(), "dashboard lacks panels {missing:?}; it has {titles:?}");
}

/// Polls the dispatcher's `/metrics` until its gauges (refreshed every 5 s) are there.
async fn dispatcher_metrics(fleet: &TestFleet) -> anyhow::Result<String> {
    let url = format!("{}/metrics", fleet.ops);
    let what = "the dispatcher's gauges (sessions_waiting >= 1, queue_messages, queue_consumers, breaker_state)";
    try_eventually(what, Duration::from_secs(20), || async {
        let text = scrape(&fleet.http, &url).await?;
        let waiting = text
            .lines()
            .find_map(|l| l.strip_prefix("agentfleet_sessions_waiting "))
            .and_then(|v| v.trim().parse::<f64>().ok());
        let ready = waiting.is_some_and(|w| w >= 1.0)
            && text.contains("agentfleet_queue_messages{")
            && text.contains("agentfleet_queue_consumers{")
            && text.contains("agentfleet_breaker_state{");
        Ok(ready.then_some(text))
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_end_to_end_runs_metrics_pass_promtool_and_feed_every_dashboard_panel() -> anyhow::Result<()> {
    ensure_promtool();
    let dash_path = repo_root().join("deploy/grafana/agentfleet-dashboard.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&dash_path)?)?;
    check_dashboard_shape(&dash);

    let fleet = TestFleet::start(FleetOptions { workers: 1, ..Default::default() }).await?;
    let mut bodies: Vec<Value> =
        (0..20).map(|i| json!({"agent": "support", "input": format!("[steps=3] session {i}")})).collect();
    // An escalation (stays waiting), tool schema errors, and a budget exhaustion.
    bodies.push(json!({"agent": "support", "input": "I want a refund, human please"}));
    bodies.push(json!({"agent": "support", "input": "[steps=3 tool=lookup_customer] bad inputs"}));
    bodies.push(json!({"agent": "support", "input": "[steps=3 tool=lookup_customer] more bad inputs"}));
    bodies.push(json!({"agent": "support", "input": "[steps=40] runs out", "budget": {"max_steps": 4}}));
    let ids: Vec<SessionId> = try_join_all(bodies.iter().map(|b| fleet.submit_json(b))).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(120)).await?;
    let statuses: Vec<&str> = sessions.iter().map(|s| s["status"].as_str().unwrap_or("?")).collect();
    assert!(statuses[..20].iter().all(|s| *s == "completed"), "statuses: {statuses:?}");
    assert_eq!(statuses[20], "awaiting_human", "the escalation: {}", sessions[20]);
    assert_eq!(statuses[23], "budget_exhausted", "the budget session: {}", sessions[23]);

    let dispatcher = dispatcher_metrics(&fleet).await?;
    let worker_url = fleet.worker_metrics_url(0).expect("worker 0");
    let worker = scrape(&fleet.http, &worker_url).await?;
    check_metrics("dispatcher", &dispatcher);
    check_metrics("worker", &worker);

    // Every metric the dashboard queries is in what the fleet serves.
    let mut served = Exposition::default();
    served.add(&dispatcher);
    served.add(&worker);
    let defined = defined_metrics();
    let mut missing = Vec::new();
    let mut undefined = Vec::new();
    let mut used = BTreeSet::new();
    for (title, expr) in dashboard_exprs(&dash) {
        for name in metric_names(&expr) {
            let family = served.family(&name);
            let family = if served.types.contains_key(&family) {
                family
            } else {
                // Not served at all: map the suffix back by name to report the histogram.
                ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
                    .map_or(name.clone(), str::to_owned)
            };
            if !defined.contains(&family) {
                undefined.push(format!("{title}: {name}"));
            }
            if !served.with_samples.contains(&family) {
                missing.push(format!("{title}: {name}"));
            }
            used.insert(family);
        }
    }
    println!("dashboard queries {} metrics: {used:?}", used.len());
    assert!(undefined.is_empty(), "dashboard queries metrics telemetry.rs does not define: {undefined:?}");
    assert!(
        missing.is_empty(),
        "dashboard queries metrics neither /metrics serves: {missing:?}\nserved: {:?}",
        served.with_samples
    );
    fleet.cleanup().await
}

#[test]
fn metric_names_are_found_in_expressions() {
    let names = metric_names(
        "histogram_quantile(0.5, sum by (le) (rate(agentfleet_step_duration_seconds_bucket[5m]))) / agent:agentfleet_x:rate5m",
    );
    assert_eq!(names.into_iter().collect::<Vec<_>>(), ["agentfleet_step_duration_seconds_bucket"]);
}
