//! End-to-end: sessions through the dispatcher, real RabbitMQ, real Redis and worker processes.

use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, check_step_conversation};
use futures::future::try_join_all;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_five_step_sessions_complete_on_three_worker_processes() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 3, concurrency: 32, ..Default::default() }).await?;
    let goals: Vec<String> = (0..200).map(|i| format!("[steps=5] batch job {i}")).collect();
    let submits = goals.iter().map(|g| fleet.submit("support", g));
    let ids: Vec<SessionId> = try_join_all(submits).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(180)).await?;
    for s in &sessions {
        assert_eq!(s["status"], "completed", "{s}");
        assert_eq!(s["step"], 5, "{s}");
        assert_eq!(s["usage"]["model_calls"], 5, "{s}");
        assert!(s["usage"]["input_tokens"].as_u64().is_some_and(|t| t > 0), "{}", s["usage"]);
        check_step_conversation(s, 5).map_err(|e| anyhow::anyhow!("{e}: {s}"))?;
    }
    let model = fleet.model.stats();
    assert_eq!(model.invalid_total, 0, "invalid requests: {:?}", model.invalid_reasons);
    assert_eq!(model.valid_total, 1000);
    let tools = fleet.tools.stats();
    assert_eq!(tools.calls_total, 800);
    assert_eq!(tools.missing_key, 0);
    assert_eq!(tools.repeats(), 0);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn support_sessions_answer_or_escalate() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions::default()).await?;
    let answer =
        fleet.submit("support", "My API calls fail with error 500 since this morning, jane@example.com").await?;
    let escalate = fleet.submit("support", "I want a refund for last month, bob@example.com").await?;
    let done = fleet.wait_settled(&[answer, escalate], Duration::from_secs(60)).await?;
    assert_eq!(done[0]["status"], "completed", "{}", done[0]);
    assert!(done[0]["result"].as_str().is_some_and(|r| !r.is_empty()));
    assert_eq!(done[1]["status"], "awaiting_human", "{}", done[1]);
    let escalation = &done[1]["escalation"];
    assert!(escalation["tool_use_id"].as_str().is_some_and(|id| id.starts_with("toolu_")), "{escalation}");
    assert!(escalation["input"]["reason"].is_string(), "{escalation}");
    let calls = fleet.tools.stats();
    assert_eq!(calls.by_tool.get("lookup_customer"), Some(&2));
    assert_eq!(fleet.model.stats().invalid_total, 0, "{:?}", fleet.model.stats().invalid_reasons);
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_step_sessions_pass_on_an_openai_compatible_provider() -> anyhow::Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 2, ..Default::default() }).await?;
    let goals: Vec<String> = (0..40).map(|i| format!("[steps=5] local job {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("local", g))).await?;
    let sessions = fleet.wait_settled(&ids, Duration::from_secs(120)).await?;
    for s in &sessions {
        assert_eq!(s["status"], "completed", "{s}");
        check_step_conversation(s, 5).map_err(|e| anyhow::anyhow!("{e}: {s}"))?;
    }
    let stats = fleet.openai.stats();
    assert_eq!(stats.invalid_total, 0, "{:?}", stats.invalid_reasons);
    assert_eq!(stats.valid_total, 200);
    assert_eq!(fleet.model.stats().requests_total, 0, "nothing went to the Anthropic endpoint");
    assert_eq!(fleet.tools.stats().calls_total, 160);
    fleet.cleanup().await
}

/// One config, one worker per pool: `AGENTFLEET_POOLS` picks what a worker consumes, so a pool's
/// sessions wait for a worker of that pool however busy the others are.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_worker_consumes_the_pools_it_is_started_with() -> anyhow::Result<()> {
    let research = r#"
[agents.research]
model = "claude-sonnet-4-5"
system_prompt = "You research."
tools = ["search_knowledge_base"]
pool = "research"
"#;
    let opts = FleetOptions { workers: 0, extra_config: research.into(), ..Default::default() };
    let mut fleet = TestFleet::start(opts).await?;
    fleet.spawn_worker_with_env(&[("AGENTFLEET_POOLS", "default")])?;
    let support = fleet.submit("support", "[steps=2] a default-pool job").await?;
    let researched = fleet.submit("research", "[steps=2] a research-pool job").await?;
    fleet.wait_settled(std::slice::from_ref(&support), Duration::from_secs(60)).await?;
    // The default pool's worker finished its session; the research session is still at its first step.
    let waiting = fleet.session(&researched).await?;
    assert_eq!(waiting["status"], "queued", "{waiting}");

    fleet.spawn_worker_with_env(&[("AGENTFLEET_POOLS", "research")])?;
    let done = fleet.wait_settled(std::slice::from_ref(&researched), Duration::from_secs(60)).await?;
    assert_eq!(done[0]["status"], "completed", "{}", done[0]);
    fleet.cleanup().await
}
