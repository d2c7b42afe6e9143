//! `POST /v1/sessions/{id}/fork`: a new session from a step of another, through a real fleet.
//!
//! The fork's conversation is the original's as the step began, byte for byte; it runs from there
//! with its own usage, ledger and budget, and says where it came from. Its last user message can
//! be replaced. Steps that do not exist, other tenants and read-only tokens are refused.

use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, TestToken, client_with_token, token_secret};
use anyhow::{Context as _, Result, ensure};
use serde_json::{Value, json};

const SETTLE: Duration = Duration::from_secs(60);

/// POSTs a fork of `id` with `body` as `client`: the status and the answer.
async fn fork(fleet: &TestFleet, client: &reqwest::Client, id: &SessionId, body: &Value) -> Result<(u16, Value)> {
    let r = client.post(format!("{}/v1/sessions/{id}/fork", fleet.api)).json(body).send().await?;
    let status = r.status().as_u16();
    Ok((status, r.json().await.unwrap_or(Value::Null)))
}

fn id_of(answer: &Value) -> Result<SessionId> {
    Ok(SessionId::parse(answer["id"].as_str().context("no id")?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fork_runs_again_from_a_step_with_a_fresh_budget() -> Result<()> {
    let tokens = vec![
        TestToken::new("acme-submit", "acme", &["submit", "read"]),
        TestToken::new("acme-reader", "acme", &["read"]),
        TestToken::new("globex", "globex", &["submit", "read"]),
    ];
    let fleet = TestFleet::start(FleetOptions { workers: 1, tokens, ..FleetOptions::default() }).await?;
    let acme = client_with_token(&token_secret("acme-submit"));
    let created: Value = acme
        .post(format!("{}/v1/sessions", fleet.api))
        .json(&json!({ "agent": "support", "input": "[steps=4] fork me" }))
        .send()
        .await?
        .json()
        .await?;
    let original_id = id_of(&created)?;
    let original = fleet.wait_settled(std::slice::from_ref(&original_id), SETTLE).await?.remove(0);
    ensure!(original["status"] == "completed", "{original}");
    let messages = original["messages"].as_array().context("messages")?;

    // From step 2: the first three messages (goal, first answer, its tool results), then three
    // more model calls of its own; nothing of the original's usage.
    let (status, answer) = fork(&fleet, &acme, &original_id, &json!({ "from_step": 2 })).await?;
    ensure!(status == 202, "{status} {answer}");
    let fork_id = id_of(&answer)?;
    let forked = fleet.wait_settled(std::slice::from_ref(&fork_id), SETTLE).await?.remove(0);
    ensure!(forked["status"] == "completed", "{forked}");
    ensure!(forked["forked_from"] == json!({ "session": original_id.as_str(), "step": 2 }), "{forked}");
    let fork_messages = forked["messages"].as_array().context("messages")?;
    ensure!(fork_messages[..3] == messages[..3], "the fork begins with the original's conversation before step 2");
    ensure!(fork_messages.len() == messages.len(), "it ran the rest: {} vs {}", fork_messages.len(), messages.len());
    ensure!(forked["usage"]["model_calls"] == 3, "three calls of its own: {}", forked["usage"]);
    ensure!(forked["tenant"] == "acme" && forked["agent"] == "support", "{forked}");
    let trace = fleet.trace(&fork_id).await?;
    let traced = &trace["summary"]["cost_micro_usd"];
    ensure!(
        forked["usage"]["cost_micro_usd"] == *traced,
        "its cost is its own trace's: {} vs {traced}",
        forked["usage"]
    );
    let calls = trace["records"].as_array().map_or(0, |r| r.iter().filter(|r| r["action"] == "model_call").count());
    ensure!(calls == 3, "its trace holds its own three calls: {calls}");
    ensure!(original["usage"]["model_calls"] == 4, "the original is untouched: {}", original["usage"]);

    // From step 1 with another first message: the new goal runs, one step.
    let body = json!({ "from_step": 1, "replace_last_user_message": "[steps=1] a different question",
                       "budget": { "max_steps": 3 } });
    let (status, answer) = fork(&fleet, &acme, &original_id, &body).await?;
    ensure!(status == 202, "{status} {answer}");
    let replaced = fleet.wait_settled(&[id_of(&answer)?], SETTLE).await?.remove(0);
    ensure!(replaced["status"] == "completed", "{replaced}");
    ensure!(replaced["messages"][0]["content"][0]["text"] == "[steps=1] a different question", "{replaced}");
    ensure!(replaced["limits"]["max_steps"] == 3, "{}", replaced["limits"]);

    // Refused: a step it never reached, step 0, an unknown agent, a read-only token, another tenant.
    let (status, answer) = fork(&fleet, &acme, &original_id, &json!({ "from_step": 9 })).await?;
    ensure!(status == 409, "{status} {answer}");
    let message = answer["error"]["message"].as_str().unwrap_or_default();
    ensure!(message.contains("steps 1 to 4, not 9"), "{message}");
    let (status, _) = fork(&fleet, &acme, &original_id, &json!({ "from_step": 0 })).await?;
    ensure!(status == 400, "{status}");
    let (status, answer) = fork(&fleet, &acme, &original_id, &json!({ "from_step": 1, "agent": "nobody" })).await?;
    ensure!(status == 400 && answer["error"]["message"].as_str().unwrap_or("").contains("nobody"), "{answer}");
    let reader = client_with_token(&token_secret("acme-reader"));
    let (status, _) = fork(&fleet, &reader, &original_id, &json!({ "from_step": 1 })).await?;
    ensure!(status == 403, "{status}");
    let globex = client_with_token(&token_secret("globex"));
    let (status, _) = fork(&fleet, &globex, &original_id, &json!({ "from_step": 1 })).await?;
    ensure!(status == 404, "another tenant's session is not there: {status}");
    let anonymous = reqwest::Client::new();
    let (status, _) = fork(&fleet, &anonymous, &original_id, &json!({ "from_step": 1 })).await?;
    ensure!(status == 401, "{status}");
    fleet.cleanup().await
}
