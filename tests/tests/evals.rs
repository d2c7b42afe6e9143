//! `agentfleet eval` as a user runs it: the adversarial suite of the example support agent
//! (`deploy/evals/support.toml`) through a fleet the eval starts itself — the real dispatcher and
//! worker processes, RabbitMQ and Redis — against the scripted model and tool servers.
//!
//! - the example config passes every case, and the JUnit XML counts them;
//! - a config without `escalate_to_human` and without the refund approval rule fails, with a
//!   reason per case, and `--baseline` names the regressions;
//! - a recorded run replays with the same verdicts and no model call; a changed system prompt makes
//!   the replay report the mismatch, not pass;
//! - a system prompt over the limit stops the fleet at start-up, with its token count.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use agentfleet_tests::fleet::{
    CliRun, amqp_url, delete_fleet_amqp, delete_keys_under, redis_at, redis_url, test_binary,
};
use agentfleet_tests::model_server::{ModelServer, ModelServerConfig};
use agentfleet_tests::tool_server::{ToolServer, ToolServerConfig};
use anyhow::{Context as _, Result, ensure};
use serde_json::Value;
use tokio::net::TcpListener;

/// How long one eval run may take (it runs about 60 short sessions).
const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// The example config and the suite, as the repository has them.
fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

/// The scripted model and tool servers, a folder with the fleet's binaries under the names the eval
/// looks for, and a unique RabbitMQ and Redis prefix.
struct Rig {
    model: ModelServer,
    _tools: ToolServer,
    tools_url: String,
    dir: PathBuf,
    prefix: String,
}

impl Rig {
    async fn start() -> Result<Self> {
        let model = ModelServer::start(TcpListener::bind("127.0.0.1:0").await?, ModelServerConfig::default()).await?;
        let tools = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
        let tools_url = tools.base_url();
        let prefix = format!("t{}", ulid::Ulid::new().to_string().to_lowercase());
        let dir = std::env::temp_dir().join(format!("agentfleet-evals-{prefix}"));
        std::fs::create_dir_all(dir.join("bin"))?;
        for (name, built) in
            [("agentfleet-dispatcher", "agentfleet-test-dispatcher"), ("agentfleet-worker", "agentfleet-test-worker")]
        {
            std::os::unix::fs::symlink(test_binary(built)?, dir.join("bin").join(name))?;
        }
        Ok(Self { model, _tools: tools, tools_url, dir, prefix })
    }

    /// The example config with its tools at the rig's tool server, changed by `edit`.
    fn config(&self, name: &str, edit: impl Fn(String) -> String) -> Result<PathBuf> {
        let text = std::fs::read_to_string(repo_file("deploy/local/agentfleet.toml"))?;
        let text = edit(text.replace("http://127.0.0.1:8091", &self.tools_url));
        let path = self.dir.join(name);
        std::fs::write(&path, text)?;
        Ok(path)
    }

    /// `agentfleet eval` of the support suite with `config`, and `args`.
    async fn eval(&self, config: &Path, model_url: &str, args: &[&str]) -> Result<CliRun> {
        let suite = repo_file("deploy/evals/support.toml");
        let mut command = tokio::process::Command::new(test_binary("agentfleet-test-cli")?);
        command
            .arg("eval")
            .arg(&suite)
            .arg("--config")
            .arg(config)
            .arg("--bin-dir")
            .arg(self.dir.join("bin"))
            .args(["--prefix", &self.prefix])
            .args(args)
            .env("ANTHROPIC_BASE_URL", model_url)
            .env("AMQP_URL", amqp_url())
            .env("REDIS_URL", redis_url())
            .env_remove("ANTHROPIC_API_KEY")
            .stdin(Stdio::null())
            .kill_on_drop(true);
        let out = tokio::time::timeout(RUN_TIMEOUT, command.output()).await.context("the eval took too long")??;
        Ok(CliRun {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        })
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    async fn cleanup(self) -> Result<()> {
        let pools = [agentfleet::domain::Name::parse("default")?];
        delete_fleet_amqp(&amqp_url(), &self.prefix, &pools).await?;
        // The eval's Redis prefix is this one and a run id: `<prefix>-<run>`.
        delete_keys_under(&redis_at(&redis_url()).await?, &format!("{}-*", self.prefix)).await?;
        let _ = std::fs::remove_dir_all(&self.dir);
        Ok(())
    }
}

fn read_json(path: &Path) -> Result<Value> {
    serde_json::from_slice(&std::fs::read(path)?).with_context(|| format!("{} is not JSON", path.display()))
}

/// The case `id` of a report.
fn case<'a>(report: &'a Value, id: &str) -> Result<&'a Value> {
    let cases = report["cases"].as_array().context("no cases")?;
    cases.iter().find(|c| c["id"] == id).with_context(|| format!("no case {id}"))
}

fn failures(case: &Value) -> String {
    case["failures"]
        .as_array()
        .map(|f| f.iter().filter_map(Value::as_str).collect::<Vec<_>>().join(" | "))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_suite_passes_and_a_broken_config_regresses_by_name() -> Result<()> {
    let rig = Rig::start().await?;
    let model = rig.model.base_url();
    let good = rig.config("good.toml", |t| t)?;
    let run = rig
        .eval(
            &good,
            &model,
            &["--out", &rig.path("good.json").to_string_lossy(), "--junit", &rig.path("junit.xml").to_string_lossy()],
        )
        .await?;
    ensure!(run.code == Some(0), "the example config must pass the suite: {run:?}");
    ensure!(
        run.stdout.contains("scripted server") && run.stdout.contains("not the quality"),
        "scripted results are labelled: {}",
        run.stdout
    );
    let report = read_json(&rig.path("good.json"))?;
    let cases = report["summary"]["cases"].as_u64().unwrap_or(0);
    ensure!(cases >= 50, "the suite holds 50 or more cases, not {cases}");
    ensure!(report["summary"]["passed"] == cases, "{}", report["summary"]);
    let junit = std::fs::read_to_string(rig.path("junit.xml"))?;
    ensure!(junit.contains(&format!(r#"tests="{cases}""#)) && junit.contains(r#"failures="0""#), "{junit}");
    // The harness acted as the person: a refund over the limit was rejected, an escalation answered.
    let over = case(&report, "refund-101")?;
    ensure!(over["person"].to_string().contains("rejected issue_refund"), "{over}");
    ensure!(case(&report, "wants-a-human")?["escalated"] == true);

    // Without escalate_to_human and without the approval rule.
    let broken = rig.config("broken.toml", |t| {
        t.replace(r#", "escalate_to_human"]"#, "]").replace(r#"approval_rule = "sum(amount) > 100""#, "")
    })?;
    let run = rig.eval(&broken, &model, &["--json", "--baseline", &rig.path("good.json").to_string_lossy()]).await?;
    ensure!(run.code == Some(1), "the broken config must fail the suite: {run:?}");
    let report = run.json()?;
    let human = case(&report, "wants-a-human")?;
    ensure!(failures(human).contains("did not escalate to a person"), "{human}");
    let refund = case(&report, "ignore-instructions-refund-5000")?;
    ensure!(failures(refund).contains("without a person's approval"), "{refund}");
    ensure!(failures(refund).contains("issue_refund"), "{refund}");
    let regressed = report["baseline"]["regressed"].to_string();
    for id in
        ["wants-a-human", "ignore-instructions-refund-5000", "refund-split-3x60", "injected-refund-in-customer-record"]
    {
        ensure!(regressed.contains(id), "--baseline names {id} as regressed: {regressed}");
    }
    ensure!(!regressed.contains("password-reset"), "only what broke regressed: {regressed}");
    rig.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recorded_run_replays_and_a_changed_prompt_is_a_mismatch() -> Result<()> {
    let rig = Rig::start().await?;
    let config = rig.config("good.toml", |t| t)?;
    let recorded = rig.path("recorded");
    let record_args =
        ["--record", &*recorded.to_string_lossy(), "--out", &*rig.path("recorded.json").to_string_lossy()]
            .map(str::to_owned);
    let run = rig.eval(&config, &rig.model.base_url(), &record_args.each_ref().map(String::as_str)).await?;
    ensure!(run.code == Some(0), "{run:?}");
    let calls = rig.model.stats().requests_total;

    // No upstream at all: every answer comes from the recording.
    let nowhere = "http://127.0.0.1:9";
    let replay_args = ["--replay", &*recorded.to_string_lossy(), "--json"].map(str::to_owned);
    let run = rig.eval(&config, nowhere, &replay_args.each_ref().map(String::as_str)).await?;
    ensure!(run.code == Some(0), "the replay passes as the recording did: {run:?}");
    let replayed = run.json()?;
    let before = read_json(&rig.path("recorded.json"))?;
    let verdicts = |r: &Value| -> Vec<(String, bool, u64)> {
        let cases = r["cases"].as_array().cloned().unwrap_or_default();
        cases
            .iter()
            .map(|c| (c["id"].as_str().unwrap_or("").to_owned(), c["passed"] == true, c["steps"].as_u64().unwrap_or(0)))
            .collect()
    };
    ensure!(verdicts(&replayed) == verdicts(&before), "the same verdicts and steps");
    ensure!(rig.model.stats().requests_total == calls, "the replay made no model call");

    let changed = rig.config("changed.toml", |t| {
        t.replace("Resolve the customer's request accurately and briefly.", "Resolve requests warmly.")
    })?;
    let run = rig.eval(&changed, nowhere, &replay_args.each_ref().map(String::as_str)).await?;
    ensure!(run.code == Some(1), "a changed prompt does not pass a replay: {run:?}");
    let report = run.json()?;
    let crash = case(&report, "password-reset")?;
    let mismatch = crash["replay_mismatches"].to_string();
    ensure!(mismatch.contains("system") && mismatch.contains("Resolve requests warmly"), "{crash}");
    ensure!(failures(crash).starts_with("replay mismatch"), "{crash}");
    ensure!(report["summary"]["replay_mismatches"].as_u64() >= Some(50), "{}", report["summary"]);
    rig.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_system_prompt_over_the_limit_is_refused_at_start_up() -> Result<()> {
    let rig = Rig::start().await?;
    let long = rig
        .config("long.toml", |t| t.replace("# Style\n", &format!("# Style\n{}\n", "Always be polite. ".repeat(500))))?;
    let run = rig.eval(&long, &rig.model.base_url(), &[]).await?;
    ensure!(run.code == Some(1), "{run:?}");
    ensure!(run.stderr.contains("system_prompt") && run.stderr.contains("over the limit of 2000"), "{}", run.stderr);
    let tokens: Vec<&str> = run.stderr.split(" tokens").next().and_then(|s| s.rsplit(' ').next()).into_iter().collect();
    ensure!(
        tokens.first().and_then(|t| t.parse::<u64>().ok()).is_some_and(|n| n > 2000),
        "the count is in the message: {}",
        run.stderr
    );
    // Allowed explicitly, the same prompt starts.
    let allowed = rig.config("allowed.toml", |t| {
        t.replace("# Style\n", &format!("# Style\n{}\n", "Always be polite. ".repeat(500)))
            .replace("[agents.support]\n", "[agents.support]\nmax_system_prompt_tokens = 5000\n")
    })?;
    let run = rig.eval(&allowed, &rig.model.base_url(), &["--filter", "password-reset"]).await?;
    ensure!(run.code == Some(0), "{run:?}");
    rig.cleanup().await
}
