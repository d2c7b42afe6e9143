//! Traces account for every step and add up to the recorded usage; secrets never reach logs or
//! traces.

use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet};
use agentfleet_tests::model_server::Faults;
use futures::future::try_join_all;
use serde_json::{Value, json};

async fn trace(fleet: &TestFleet, id: &SessionId) -> anyhow::Result<Value> {
    fleet.trace(id).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_sessions_trace_accounts_for_every_step_and_adds_up() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions {
        workers: 2,
        worker_config: "max_model_attempts = 30".into(),
        ..Default::default()
    })
    .await?;
    fleet.model.set_faults(Faults { rate_529: 0.2, ..Default::default() });
    let bodies = [
        json!({"agent": "support", "input": "[steps=5] traced"}),
        json!({"agent": "support", "input": "[steps=40] runs out", "budget": {"max_steps": 4}}),
        json!({"agent": "support", "input": "[steps=3 tool=lookup_customer] bad inputs"}),
    ];
    let ids: Vec<SessionId> = try_join_all(bodies.iter().map(|b| fleet.submit_json(b))).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(120)).await?;
    for (s, id) in sessions.iter().zip(&ids) {
        let t = trace(&fleet, id).await?;
        let sum = &t["summary"];
        let usage = &s["usage"];
        assert_eq!(sum["input_tokens"], usage["input_tokens"], "{id}: {sum} vs {usage}");
        assert_eq!(sum["output_tokens"], usage["output_tokens"], "{id}");
        assert_eq!(sum["cost_micro_usd"], usage["cost_micro_usd"], "{id}");
        let records = t["records"].as_array().cloned().unwrap_or_default();
        let last_step = s["step"].as_u64().unwrap_or(0);
        for step in 1..=last_step {
            let has_call = records.iter().any(|r| {
                r["step"] == step
                    && (r["action"] == "model_call" || r["action"] == "summary_call")
                    && r["success"] == true
            });
            assert!(has_call, "{id}: no successful model call recorded for step {step}");
        }
        for r in &records {
            for field in [
                "agent_id",
                "session_id",
                "step",
                "action",
                "input_summary",
                "output_summary",
                "input_tokens",
                "output_tokens",
                "cost_usd",
                "duration_ms",
                "success",
                "worker",
            ] {
                assert!(!r[field].is_null(), "{id}: record without {field}: {r}");
            }
        }
    }
    // The 3-step session called a tool with bad input: its trace shows those errors per tool.
    let bad = trace(&fleet, &ids[2]).await?;
    assert_eq!(bad["summary"]["tools_used"]["lookup_customer"], 2);
    assert!(bad["summary"]["errors"].as_u64().is_some_and(|e| e >= 2), "{}", bad["summary"]);
    // Model errors (529s) are in the trace too, with no tokens: they were not billed.
    let failed_calls: u64 = {
        let mut n = 0;
        for id in &ids {
            let t = trace(&fleet, id).await?;
            n += t["records"]
                .as_array()
                .map_or(0, |r| r.iter().filter(|r| r["action"] == "model_call" && r["success"] == false).count())
                as u64;
        }
        n
    };
    assert_eq!(failed_calls, fleet.model.stats().injected.r529, "every injected fault is in a trace");
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_keys_and_sensitive_fields_never_reach_logs_or_traces() -> anyhow::Result<()> {
    const KEY: &str = "sk-ant-api03-TOPSECRET-7f3a9c";
    const CARD: &str = "4111-1111-1111-1111";
    let opts = FleetOptions {
        workers: 0,
        extra_config: "\n[telemetry]\nredact_fields = [\"card_number\", \"email\"]\n".into(),
        ..Default::default()
    };
    let mut fleet = TestFleet::start(opts).await?;
    fleet.spawn_worker_with_env(&[("ANTHROPIC_API_KEY", KEY), ("RUST_LOG", "debug")])?;
    let goals = [
        "[steps=3] plain".to_owned(),
        format!("My card_number is {CARD}, please help, alice@example.com"),
        "[stop=refusal] no".to_owned(),
    ];
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;
    fleet.wait_settled(&ids, Duration::from_secs(60)).await?;
    let mut logs = String::new();
    for entry in std::fs::read_dir(fleet.log_dir())? {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == "log") {
            logs.push_str(&std::fs::read_to_string(path)?);
        }
    }
    assert!(logs.len() > 1000, "the worker logged at debug level ({} bytes)", logs.len());
    assert!(!logs.contains(KEY), "the API key is in the worker's logs");
    let mut traces = String::new();
    for id in &ids {
        traces.push_str(&trace(&fleet, id).await?.to_string());
    }
    assert!(!traces.contains(KEY), "the API key is in a trace");
    assert!(traces.contains("lookup_customer"), "the traces are there to search");
    // The configured sensitive field is redacted wherever it is a JSON field: the lookup's input and
    // the customer record it returned.
    let support = trace(&fleet, &ids[1]).await?;
    let lookup = support["records"]
        .as_array()
        .and_then(|r| r.iter().find(|r| r["tool_name"] == "lookup_customer").cloned())
        .ok_or_else(|| anyhow::anyhow!("no lookup_customer record"))?;
    for field in ["input_summary", "output_summary"] {
        let text = lookup[field].as_str().unwrap_or_default();
        assert!(text.contains("[redacted]") && !text.contains("alice@example.com"), "{field}: {text}");
    }
    assert!(fleet.model.stats().requests_total > 0);
    fleet.cleanup().await
}
