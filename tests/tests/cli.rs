//! The `agentfleet` CLI as a process against a real fleet: escalations answered from the command
//! line, `submit --wait` and its exit codes, listing, cancelling, approvals, and the API's errors.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use agentfleet_tests::fleet::{CliRun as Run, FleetOptions, TestFleet, cli_binary, try_eventually};
use agentfleet_tests::serve::Served;
use anyhow::Context;
use serde_json::Value;
use tokio::io::AsyncWriteExt;

/// The CLI, pointed at a fleet's dispatcher through `AGENTFLEET_URL`, with `AGENTFLEET_TOKEN` set
/// to `token` (or unset).
struct Cli {
    bin: PathBuf,
    url: String,
    token: Option<String>,
}

impl Cli {
    fn of(fleet: &TestFleet) -> anyhow::Result<Self> {
        Ok(Self {
            bin: cli_binary()?,
            url: fleet.api.clone(),
            token: Some(agentfleet_tests::fleet::ADMIN_TOKEN.to_owned()),
        })
    }

    /// Runs `agentfleet ARGS` with `stdin` as its input.
    async fn run_with_stdin(&self, args: &[&str], stdin: &str) -> anyhow::Result<Run> {
        let mut child = tokio::process::Command::new(&self.bin)
            .args(args)
            .env("AGENTFLEET_URL", &self.url)
            .env_remove("AGENTFLEET_TOKEN")
            .envs(self.token.iter().map(|t| ("AGENTFLEET_TOKEN", t)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("spawning agentfleet-test-cli")?;
        let mut input = child.stdin.take().context("no stdin")?;
        input.write_all(stdin.as_bytes()).await?;
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output()).await??;
        let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
        Ok(Run { code: out.status.code(), stdout: text(out.stdout), stderr: text(out.stderr) })
    }

    async fn run(&self, args: &[&str]) -> anyhow::Result<Run> {
        self.run_with_stdin(args, "").await
    }

    /// `agentfleet --json ARGS`, which must succeed; its document.
    async fn json(&self, args: &[&str]) -> anyhow::Result<Value> {
        let args: Vec<&str> = ["--json"].iter().chain(args).copied().collect();
        self.run(&args).await?.ok()?.json()
    }

    /// `submit --json` of `goal` to the support agent; the new session's id.
    async fn submit(&self, goal: &str) -> anyhow::Result<String> {
        let created = self.json(&["submit", "--agent", "support", goal]).await?;
        created["id"].as_str().map(str::to_owned).with_context(|| format!("no id in {created}"))
    }

    /// Polls `status ID --json` until the session is in `status`.
    async fn wait_status(&self, id: &str, status: &str) -> anyhow::Result<Value> {
        let what = format!("`status {id}` to report {status}");
        try_eventually(&what, Duration::from_secs(30), || async {
            let s = self.json(&["status", id]).await?;
            Ok((s["status"] == status).then_some(s))
        })
        .await
    }
}

/// The `tool_result` answering the first `tool_use` of `tool` in a session's conversation.
fn result_of(session: &Value, tool: &str) -> anyhow::Result<Value> {
    let blocks: Vec<&Value> = session["messages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["content"].as_array())
        .flatten()
        .collect();
    let call = blocks.iter().find(|b| b["type"] == "tool_use" && b["name"] == tool).context("no such tool_use")?;
    let result = blocks.iter().find(|b| b["type"] == "tool_result" && b["tool_use_id"] == call["id"]);
    result.map(|r| (*r).clone()).with_context(|| format!("no tool_result for {call}"))
}

const REFUND_GOAL: &str = "I want a refund for my subscription, bob@example.com";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_human_answers_an_escalation_from_the_command_line() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let cli = Cli::of(&fleet)?;
    let id = cli.submit(REFUND_GOAL).await?;
    let waiting = cli.wait_status(&id, "awaiting_human").await?;
    assert_eq!(waiting["escalation"]["kind"], "human", "{waiting}");

    let queue = cli.run(&["escalations"]).await?.ok()?;
    let row = queue.stdout.lines().find(|l| l.contains(&id)).with_context(|| format!("not listed: {queue:?}"))?;
    assert!(row.contains("support") && row.contains("human"), "{row}");
    let status = cli.run(&["status", &id]).await?.ok()?;
    assert!(status.stdout.contains(&format!("agentfleet reply {id}")), "{status:?}");

    let replied = cli.run(&["reply", &id, "Refund approved by Alice"]).await?.ok()?;
    assert!(replied.stdout.contains("running again"), "{replied:?}");
    let watched = cli.run(&["watch", &id]).await?.ok()?;
    assert!(watched.stdout.contains("← escalate_to_human: Refund approved by Alice"), "{watched:?}");
    assert!(watched.stdout.contains("completed"), "{watched:?}");

    let done = cli.json(&["status", &id]).await?;
    assert_eq!(done["status"], "completed", "{done}");
    let answer = result_of(&done, "escalate_to_human")?;
    assert_eq!(answer["content"], "Refund approved by Alice", "{answer}");
    assert_eq!(answer["is_error"], false, "{answer}");
    let result = done["result"].as_str().unwrap_or_default();
    assert!(result.contains("Refund approved by Alice"), "the model quoted the human: {result}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn submit_wait_list_cancel_and_errors() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let cli = Cli::of(&fleet)?;
    // The goal comes from stdin (`-`); --wait follows the session and exits 0 once it completed.
    let run =
        cli.run_with_stdin(&["submit", "--agent", "support", "--wait", "-"], "[steps=3] cli job\n").await?.ok()?;
    let mut lines = run.stdout.lines();
    let id = lines.next().context("no id")?.to_owned();
    assert!(id.starts_with("s_"), "{run:?}");
    assert!(run.stdout.contains("step 3  completed"), "{run:?}");
    assert_eq!(lines.last(), Some("Done after 3 steps."), "{run:?}");

    // Fork it from step 2 with --wait: the fork runs the two steps left and says where it came from.
    let run = cli.run(&["fork", &id, "--from-step", "2", "--wait"]).await?.ok()?;
    let fork = run.stdout.lines().next().context("no fork id")?.to_owned();
    assert!(fork.starts_with("s_") && fork != id, "{run:?}");
    assert_eq!(run.stdout.lines().last(), Some("Done after 3 steps."), "{run:?}");
    let status = cli.run(&["status", &fork]).await?.ok()?;
    assert!(status.stdout.contains(&format!("fork of  {id} at step 2")), "{status:?}");
    let run = cli.run(&["fork", &id, "--from-step", "7"]).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains("steps 1 to 3, not 7"), "the API's message: {run:?}");

    // A session that escalates: --wait exits 2 and says how to answer; cancel stops it at once.
    let run = cli.run(&["submit", "--agent", "support", "--wait", REFUND_GOAL]).await?;
    assert_eq!(run.code, Some(2), "{run:?}");
    let waiting = run.stdout.lines().next().context("no id")?.to_owned();
    assert!(run.stdout.contains(&format!("agentfleet reply {waiting}")), "{run:?}");

    let listed = cli.json(&["list"]).await?;
    let ids: Vec<&str> = listed["sessions"].as_array().into_iter().flatten().filter_map(|s| s["id"].as_str()).collect();
    assert!(ids.contains(&id.as_str()) && ids.contains(&waiting.as_str()), "{listed}");
    let paged = cli.run(&["list", "--limit", "1", "--all"]).await?.ok()?;
    assert!(paged.stdout.contains(&id) && paged.stdout.contains(&waiting), "--all follows the cursor: {paged:?}");
    let filtered = cli.json(&["list", "--status", "completed"]).await?;
    assert_eq!(filtered["sessions"].as_array().map(Vec::len), Some(2), "the session and its fork: {filtered}");

    let cancelled = cli.run(&["cancel", &waiting]).await?.ok()?;
    assert!(cancelled.stdout.contains("cancelled"), "{cancelled:?}");
    cli.wait_status(&waiting, "cancelled").await?;
    let again = cli.run(&["cancel", &waiting]).await?;
    assert_eq!(again.code, Some(1), "{again:?}");
    assert!(again.stderr.contains("already ended"), "{again:?}");

    let unknown = "s_01ARZ3NDEKTSV4RRFFQ69G5FAV";
    let run = cli.run(&["status", unknown, "--url", &fleet.api]).await?;
    assert_eq!(run.code, Some(1), "{run:?}");
    assert!(run.stderr.contains(&format!("no session `{unknown}`")), "the API's message: {run:?}");
    assert!(run.stdout.is_empty(), "{run:?}");
    let run = cli.run(&["status", "nonsense"]).await?;
    assert!(run.code.is_some_and(|c| c != 0) && run.stderr.contains("id:"), "{run:?}");
    let run = cli.run(&["list", "--url", "http://127.0.0.1:9"]).await?;
    assert_eq!(run.code, Some(1), "an unreachable dispatcher is an error: {run:?}");
    assert!(!run.stderr.contains("panicked"), "{run:?}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_refund_is_approved_from_the_command_line_and_runs_once() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let cli = Cli::of(&fleet)?;
    let id = cli.submit("[refund=150] please").await?;
    let waiting = cli.wait_status(&id, "awaiting_approval").await?;
    assert_eq!(waiting["escalation"]["tool"], "issue_refund", "{waiting}");
    assert_eq!(fleet.tools.stats().by_tool.get("issue_refund"), None, "nothing ran before the approval");

    let queue = cli.json(&["escalations"]).await?;
    let listed = queue["escalations"].as_array().into_iter().flatten().find(|e| e["session_id"] == id.as_str());
    assert_eq!(listed.map(|e| e["kind"].clone()), Some("approval".into()), "{queue}");
    let reply = cli.run(&["reply", &id, "ok"]).await?;
    assert_eq!(reply.code, Some(1), "a reply is not an approval: {reply:?}");
    assert!(reply.stderr.contains("approve or reject"), "{reply:?}");

    let approved = cli.run(&["approve", &id, "--note", "ok by finance"]).await?.ok()?;
    assert!(approved.stdout.contains("running again"), "{approved:?}");
    let twice = cli.run(&["approve", &id]).await?;
    assert_eq!(twice.code, Some(1), "approving twice is refused: {twice:?}");
    let watched = cli.run(&["watch", &id]).await?.ok()?;
    assert!(watched.stdout.contains("Refund outcome:"), "{watched:?}");
    let done = cli.json(&["status", &id]).await?;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(fleet.tools.stats().by_tool.get("issue_refund"), Some(&1), "the approved refund ran exactly once");
    fleet.cleanup().await
}

/// A stand-in for a dispatcher that asks for tokens: no token or an unknown one is a 401,
/// `reader` may read but not submit (403 naming the role), and any other token may do anything.
fn guarded_api() -> axum::Router {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    async fn answer(method: axum::http::Method, headers: HeaderMap) -> axum::response::Response {
        let error = |status: StatusCode, kind: &str, message: &str| {
            (status, axum::Json(serde_json::json!({"error": {"type": kind, "message": message}}))).into_response()
        };
        let token = headers.get("authorization").and_then(|v| v.to_str().ok()).and_then(|v| v.strip_prefix("Bearer "));
        match token {
            None => error(StatusCode::UNAUTHORIZED, "unauthorized", "missing bearer token"),
            Some("wrong") => error(StatusCode::UNAUTHORIZED, "unauthorized", "unknown token"),
            Some("reader") if method == axum::http::Method::POST => {
                error(StatusCode::FORBIDDEN, "forbidden", "this needs the `submit` role")
            }
            Some(_) if method == axum::http::Method::POST => {
                let created = serde_json::json!({"id": "s_01JD3ZK8Q8YB3Y3C2K9Q2W7X4M", "status": "queued"});
                (StatusCode::ACCEPTED, axum::Json(created)).into_response()
            }
            Some(_) => axum::Json(serde_json::json!({"sessions": [], "next_cursor": null})).into_response(),
        }
    }
    axum::Router::new().fallback(answer)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_or_refused_token_says_what_to_change() -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let served = Served::start("guarded-api", listener, guarded_api())?;
    let cli = |token: Option<&str>| -> anyhow::Result<Cli> {
        Ok(Cli { bin: cli_binary()?, url: served.base_url(), token: token.map(str::to_owned) })
    };
    let failed = |run: &Run, fragment: &str| {
        assert_eq!(run.code, Some(1), "{run:?}");
        assert!(run.stderr.contains(fragment), "stderr does not say {fragment:?}: {run:?}");
    };

    let no_token = cli(None)?.run(&["list"]).await?;
    failed(&no_token, "no token: pass --token or set AGENTFLEET_TOKEN (401 unauthorized)");
    let wrong = cli(None)?.run(&["--token", "wrong", "list"]).await?;
    failed(&wrong, "the token was not accepted: unknown token (401 unauthorized)");
    let reader = cli(Some("reader"))?;
    reader.run(&["list"]).await?.ok()?;
    let submit = reader.run(&["submit", "--agent", "support", "hello"]).await?;
    failed(&submit, "the token lacks the `submit` role this needs");
    let flag_wins = reader.run(&["--token", "admin", "submit", "--agent", "support", "hello"]).await?;
    assert_eq!(flag_wins.code, Some(0), "--token did not override AGENTFLEET_TOKEN: {flag_wins:?}");
    Ok(())
}

/// `probe` is what a container without a shell runs as its healthcheck: 0 for a 2xx answer, 1 for
/// anything else, including nothing listening.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn probe_answers_for_a_containers_healthcheck() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 1, ..Default::default() }).await?;
    let cli = Cli { token: None, ..Cli::of(&fleet)? };
    let ready = cli.run(&["probe", &format!("{}/readyz", fleet.ops)]).await?.ok()?;
    assert!(ready.stdout.contains("200"), "{ready:?}");
    let worker = fleet.worker_ops_url(0, "/readyz").context("no worker listener")?;
    agentfleet_tests::fleet::eventually("the worker's /readyz through probe", Duration::from_secs(30), || async {
        cli.run(&["probe", &worker]).await.ok().filter(|r| r.code == Some(0))
    })
    .await;
    let missing = cli.run(&["probe", &format!("{}/nothing-here", fleet.ops)]).await?;
    assert_eq!(missing.code, Some(1), "{missing:?}");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let refused = cli.run(&["probe", "--timeout-ms", "500", &format!("http://{closed}/readyz")]).await?;
    assert_eq!(refused.code, Some(1), "{refused:?}");
    fleet.cleanup().await
}
