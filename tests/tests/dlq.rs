//! The dead letters through the `agentfleet` CLI, against a real fleet: a session's step message
//! dead-lettered for real (its worker dies on it, past the queue's delivery limit), listed, shown
//! and re-driven with the CLI, and the session then completes exactly once; a second redrive of the
//! same id fails cleanly, and a duplicate of the message, re-driven, is fenced as stale. Also: the
//! tenants' walls, 401 without a token, a garbage body shown escaped and refused, and the store's
//! bound (what does not fit waits in the queue, and moves in once there is room).

use std::process::Stdio;
use std::time::Duration;

use agentfleet_tests::fleet::{
    ADMIN_TOKEN, CliRun as Run, FleetOptions, TestFleet, TestToken, check_step_conversation, cli_binary, queue_depth,
    token_secret, try_eventually,
};
use anyhow::{Context, ensure};
use lapin::BasicProperties;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(30);

/// `agentfleet ARGS` against `fleet`, as the token `secret` (or none).
async fn cli(fleet: &TestFleet, secret: Option<&str>, args: &[&str]) -> anyhow::Result<Run> {
    let out = tokio::process::Command::new(cli_binary()?)
        .args(args)
        .env("AGENTFLEET_URL", &fleet.api)
        .env_remove("AGENTFLEET_TOKEN")
        .envs(secret.map(|t| ("AGENTFLEET_TOKEN", t)))
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(60), out).await??;
    let text = |b: Vec<u8>| String::from_utf8_lossy(&b).into_owned();
    Ok(Run { code: out.status.code(), stdout: text(out.stdout), stderr: text(out.stderr) })
}

/// The dead letters `secret` sees (`dlq list --json`).
async fn listed(fleet: &TestFleet, secret: &str, extra: &[&str]) -> anyhow::Result<Value> {
    let args: Vec<&str> = ["dlq", "list", "--json"].into_iter().chain(extra.iter().copied()).collect();
    cli(fleet, Some(secret), &args).await?.ok()?.json()
}

/// Waits until `secret` sees a dead letter of session `id` in `dlq list`; returns it.
async fn dead_letter_of(fleet: &TestFleet, secret: &str, id: &str) -> anyhow::Result<Value> {
    let what = format!("a dead letter of session {id} in `agentfleet dlq list`");
    try_eventually(&what, WAIT, || async {
        let page = listed(fleet, secret, &["--session", id]).await?;
        Ok(page["dead_letters"].as_array().and_then(|rows| rows.first().cloned()))
    })
    .await
}

/// Publishes `body` to the dead-letter exchange, as a broker or a worker would dead-letter it.
async fn publish_dead(fleet: &TestFleet, body: &[u8]) -> anyhow::Result<()> {
    let (conn, ch) = fleet.amqp().await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let dead = fleet.dead_letter_queue();
    let props = BasicProperties::default().with_delivery_mode(2);
    let confirm =
        ch.basic_publish(dead.as_str().into(), "".into(), BasicPublishOptions::default(), body, props).await?.await?;
    ensure!(confirm.is_ack(), "the dead letter was not confirmed: {confirm:?}");
    let _ = conn.close(200, "done".into()).await;
    Ok(())
}

fn tokens() -> Vec<TestToken> {
    vec![
        TestToken::new("acme-ops", "acme", &["operate"]),
        TestToken::new("acme-read", "acme", &["read"]),
        TestToken::new("beta-ops", "beta", &["operate"]),
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_lettered_step_redriven_with_the_cli_completes_its_session_exactly_once() -> anyhow::Result<()> {
    // A step message is dead-lettered the first time it comes back to the queue.
    let opts =
        FleetOptions { workers: 0, amqp_config: "delivery_limit = 0".into(), tokens: tokens(), ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    let (acme, beta) = (token_secret("acme-ops"), token_secret("beta-ops"));
    let id = fleet.submit_json(&json!({"agent": "support", "input": "[steps=3] dies once", "tenant": "acme"})).await?;
    let id = id.as_str().to_owned();

    // The cause: the only worker dies (SIGKILL) right after step 1's model call, so the broker
    // takes the message back, finds it over its delivery limit, and dead-letters it.
    let crashing = fleet.spawn_worker_with_env(&[("AGENTFLEET_FAILPOINT", "after_model_call")])?;
    let status = fleet.wait_exit(crashing, WAIT).await?;
    ensure!(!status.success(), "the worker was to die at the failpoint: {status}");
    let row = dead_letter_of(&fleet, &acme, &id).await?;
    let dlq_id = row["id"].as_str().context("a dead letter id")?.to_owned();
    assert_eq!(row["kind"], "step", "{row}");
    assert_eq!(row["reason"], "delivery_limit", "{row}");
    assert_eq!((row["step"].as_u64(), row["tenant"].as_str()), (Some(1), Some("acme")), "{row}");
    assert_eq!(row["redrivable"], true, "{row}");

    // Shown in full, by the CLI, for people and as JSON.
    let shown = cli(&fleet, Some(&acme), &["dlq", "show", &dlq_id]).await?.ok()?;
    for part in [dlq_id.as_str(), "delivery_limit", id.as_str(), "x-death", "agentfleet dlq redrive"] {
        assert!(shown.stdout.contains(part), "`{part}` missing from:\n{}", shown.stdout);
    }
    let detail = cli(&fleet, Some(&acme), &["dlq", "show", &dlq_id, "--json"]).await?.ok()?.json()?;
    assert_eq!(detail["body"]["json"]["session_id"], id.as_str(), "{detail}");
    assert!(detail["queue"].as_str().is_some_and(|q| q.ends_with(".steps.default")), "{detail}");
    let body = detail["body"]["text"].as_str().context("the body")?.to_owned();

    // Another tenant sees nothing and can do nothing; no token is 401; `read` is not enough.
    let theirs = listed(&fleet, &beta, &[]).await?;
    assert_eq!(theirs["dead_letters"], json!([]), "{theirs}");
    for args in [["dlq", "show", &dlq_id], ["dlq", "redrive", &dlq_id], ["dlq", "discard", &dlq_id]] {
        let run = cli(&fleet, Some(&beta), &args).await?;
        assert!(run.code == Some(1) && run.stderr.contains("404"), "{args:?} as another tenant: {run:?}");
    }
    let anonymous = cli(&fleet, None, &["dlq", "list"]).await?;
    assert!(anonymous.code == Some(1) && anonymous.stderr.contains("401"), "{anonymous:?}");
    let raw = reqwest::Client::new().get(format!("{}/v1/dlq", fleet.api)).send().await?;
    assert_eq!(raw.status(), 401);
    assert_eq!(raw.headers().get("www-authenticate").and_then(|v| v.to_str().ok()), Some("Bearer"));
    let reader = cli(&fleet, Some(&token_secret("acme-read")), &["dlq", "list"]).await?;
    assert!(reader.code == Some(1) && reader.stderr.contains("operate"), "{reader:?}");

    // The cause removed (a worker that does not die), the CLI re-drives it: the session completes.
    fleet.spawn_worker()?;
    let redriven = cli(&fleet, Some(&acme), &["dlq", "redrive", &dlq_id]).await?.ok()?;
    assert!(redriven.stdout.contains(&format!("re-drove {dlq_id}")), "{redriven:?}");
    let done = fleet.wait_status(&fleet_id(&id)?, "completed").await?;
    check_step_conversation(&done, 3).map_err(|e| anyhow::anyhow!("{e}: {done}"))?;
    let tools = fleet.tools.stats();
    assert_eq!((tools.by_key.len(), tools.repeats()), (2, 0), "each of the 2 tool calls ran once: {tools:?}");
    assert_eq!(fleet.model.stats().invalid_total, 0, "{:?}", fleet.model.stats().invalid_reasons);

    // The same id again: gone, said plainly.
    let again = cli(&fleet, Some(&acme), &["dlq", "redrive", &dlq_id]).await?;
    assert!(again.code == Some(1) && again.stderr.contains("no dead letter"), "{again:?}");
    assert_eq!(listed(&fleet, &acme, &[]).await?["stored"], 0);

    // A duplicate of the message (a dead letter stored twice, as at-least-once allows), re-driven
    // after the session ended: the worker's claim drops it as stale, and nothing runs again.
    let stale_before = fleet.worker_counter("agentfleet_step_messages_total", "outcome=\"stale\"").await?;
    publish_dead(&fleet, body.as_bytes()).await?;
    let copy = dead_letter_of(&fleet, &acme, &id).await?;
    let copy_id = copy["id"].as_str().context("the copy's id")?.to_owned();
    ensure!(copy_id != dlq_id, "a new dead letter");
    cli(&fleet, Some(&acme), &["dlq", "redrive", &copy_id]).await?.ok()?;
    let what = "the duplicate to be dropped as stale";
    try_eventually(what, WAIT, || async {
        let stale = fleet.worker_counter("agentfleet_step_messages_total", "outcome=\"stale\"").await?;
        Ok((stale > stale_before).then_some(()))
    })
    .await?;
    let after = fleet.session(&fleet_id(&id)?).await?;
    assert_eq!(after["messages"], done["messages"], "the conversation did not change");
    let tools = fleet.tools.stats();
    assert_eq!((tools.calls_total, tools.repeats()), (2, 0), "no tool ran again: {tools:?}");
    let (conn, ch) = fleet.amqp().await?;
    assert_eq!(queue_depth(&ch, &format!("{}.steps.default", fleet.prefix)).await?, 0);
    let _ = conn.close(200, "done".into()).await;
    fleet.cleanup().await
}

fn fleet_id(id: &str) -> anyhow::Result<agentfleet::domain::SessionId> {
    Ok(agentfleet::domain::SessionId::parse(id)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_is_shown_escaped_refused_for_redrive_and_seen_by_admins_only() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 0, tokens: tokens(), ..Default::default() }).await?;
    let garbage = b"\xff\xfe not a step \x1b[31m message\x00".to_vec();
    publish_dead(&fleet, &garbage).await?;
    let what = "the garbage in the admin's `dlq list`";
    let row = try_eventually(what, WAIT, || async {
        let page = listed(&fleet, ADMIN_TOKEN, &["--kind", "unknown"]).await?;
        Ok(page["dead_letters"].as_array().and_then(|rows| rows.first().cloned()))
    })
    .await?;
    let dlq_id = row["id"].as_str().context("id")?.to_owned();
    assert_eq!((row["tenant"].clone(), row["redrivable"].clone()), (Value::Null, json!(false)), "{row}");

    let detail = cli(&fleet, Some(ADMIN_TOKEN), &["dlq", "show", &dlq_id, "--json"]).await?.ok()?.json()?;
    assert_eq!(detail["body"]["encoding"], "escaped", "{detail}");
    assert_eq!(detail["body"]["text"], "\\xff\\xfe not a step \u{1b}[31m message\u{0}", "{detail}");
    let shown = cli(&fleet, Some(ADMIN_TOKEN), &["dlq", "show", &dlq_id]).await?.ok()?;
    assert!(!shown.stdout.contains('\u{1b}') && shown.stdout.contains("\\u{1b}[31m"), "{shown:?}");
    assert!(shown.stdout.contains("not possible"), "{shown:?}");

    // No tenant is known: only admins see it.
    assert_eq!(listed(&fleet, &token_secret("acme-ops"), &[]).await?["dead_letters"], json!([]));
    let refused = cli(&fleet, Some(ADMIN_TOKEN), &["dlq", "redrive", &dlq_id]).await?;
    assert!(
        refused.code == Some(1) && refused.stderr.contains("409") && refused.stderr.contains("discard it"),
        "{refused:?}"
    );
    // A bulk redrive reports it as refused and leaves it stored.
    let bulk = cli(&fleet, Some(ADMIN_TOKEN), &["dlq", "redrive", "--all", "--json"]).await?;
    let report = bulk.json()?;
    assert_eq!((bulk.code, report["redriven"].clone()), (Some(1), json!([])), "{bulk:?}");
    assert_eq!(report["refused"][0]["id"], dlq_id.as_str(), "{report}");

    cli(&fleet, Some(ADMIN_TOKEN), &["dlq", "discard", &dlq_id]).await?.ok()?;
    let gone = cli(&fleet, Some(ADMIN_TOKEN), &["dlq", "show", &dlq_id]).await?;
    assert!(gone.code == Some(1) && gone.stderr.contains("404"), "{gone:?}");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_store_leaves_the_rest_in_the_queue_and_takes_them_once_there_is_room() -> anyhow::Result<()> {
    let opts = FleetOptions { workers: 0, dead_letters_config: "max_stored = 2".into(), ..Default::default() };
    let fleet = TestFleet::start(opts).await?;
    for i in 0..4 {
        publish_dead(&fleet, format!("poison {i}").as_bytes()).await?;
    }
    let page = try_eventually("2 stored and the rest in the queue", WAIT, || async {
        let page = listed(&fleet, ADMIN_TOKEN, &["--oldest"]).await?;
        // One is held (unacked) by the mover, waiting for room; the other is ready in the queue.
        Ok((page["stored"] == 2 && page["in_queue"] == 1).then_some(page))
    })
    .await?;
    let first = page["dead_letters"][0]["id"].as_str().context("id")?.to_owned();
    cli(&fleet, Some(ADMIN_TOKEN), &["dlq", "discard", &first]).await?.ok()?;
    try_eventually("the next one to move in", WAIT, || async {
        let page = listed(&fleet, ADMIN_TOKEN, &[]).await?;
        Ok((page["stored"] == 2 && page["in_queue"] == 0).then_some(()))
    })
    .await?;
    let page = listed(&fleet, ADMIN_TOKEN, &["--oldest", "--all"]).await?;
    let bodies: Vec<String> =
        futures::future::try_join_all(page["dead_letters"].as_array().into_iter().flatten().map(|r| {
            let id = r["id"].as_str().unwrap_or_default().to_owned();
            let fleet = &fleet;
            async move {
                let v = cli(fleet, Some(ADMIN_TOKEN), &["dlq", "show", &id, "--json"]).await?.ok()?.json()?;
                anyhow::Ok(v["body"]["text"].as_str().unwrap_or_default().to_owned())
            }
        }))
        .await?;
    assert_eq!(bodies, ["poison 1", "poison 2"], "nothing lost, oldest first");
    fleet.cleanup().await
}
