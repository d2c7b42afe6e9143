//! Bounded reads: a tool's response body is read up to a cap and the session goes on; a step
//! message over its size is dead-lettered before it is parsed; a queue declared with other
//! arguments stops the start with what to do; and a postponed step waits about what it was told.
//!
//! The tool and engine tests run in this process (the in-memory store and publisher, the real tool
//! client against the tool server); the broker tests use the real RabbitMQ under their own prefix.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use agentfleet::amqp::{
    AmqpPublisher, DELAY_TIERS, MAX_STEP_MESSAGE_BYTES, PublishError, StepPublisher, Topology, delay_tier,
};
use agentfleet::config::{AmqpConfig, HandlerConfig, ToolConfig};
use agentfleet::domain::{Name, SessionId, SessionStatus, StepMessage};
use agentfleet::guard::OpenGuard;
use agentfleet::step::Disposition;
use agentfleet::tools::{ToolLimits, ToolRun, ToolSet, escalate_definition};
use agentfleet_tests::engine_rig::EngineRig;
use agentfleet_tests::fleet::{FleetOptions, amqp_url, config_text, eventually};
use agentfleet_tests::tool_server::{ToolServer, ToolServerConfig};
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::{AMQPValue, FieldTable};
use tokio::net::TcpListener;

/// The tools that answer with too much, and an agent that calls them.
fn flood_config(tools_url: &str) -> String {
    let tool = |name: &str| {
        format!(
            "[tools.{name}]\ndescription = \"Answers at length.\"\ninput_schema = {{ type = \"object\" }}\n\
             handler = {{ kind = \"http\", url = \"{tools_url}/tools/{name}\", timeout_ms = 5000 }}\n\n"
        )
    };
    format!(
        "{}{}[agents.flooded]\nmodel = \"claude-sonnet-4-5\"\nsystem_prompt = \"You read long answers.\"\n\
         tools = [\"endless_response\", \"huge_response\"]\n",
        tool("endless_response"),
        tool("huge_response")
    )
}

/// One HTTP tool `name` of the tool server, with a small cap.
fn tool_set(server: &ToolServer, name: &str, cap: usize) -> anyhow::Result<ToolSet> {
    let def = ToolConfig {
        description: "d".into(),
        input_schema: serde_json::json!({"type": "object"}),
        handler: HandlerConfig::Http {
            url: format!("{}/tools/{name}", server.base_url()),
            method: "POST".into(),
            timeout_ms: 10_000,
            headers_from_env: BTreeMap::new(),
        },
        ..escalate_definition()
    };
    let name = Name::parse(name)?;
    let defs = BTreeMap::from([(name.clone(), def)]);
    let limits = ToolLimits { max_result_bytes: cap, ..ToolLimits::default() };
    Ok(ToolSet::build(&[name], &defs, &|_| None, limits)?)
}

#[tokio::test]
async fn a_huge_or_endless_tool_response_is_read_up_to_the_cap_only() -> anyhow::Result<()> {
    let server = ToolServer::start(TcpListener::bind("127.0.0.1:0").await?, ToolServerConfig::default()).await?;
    let cap = 1000;
    for (tool, total) in [("endless_response", "of more than 1000 bytes"), ("huge_response", "of 67108864 bytes")] {
        let set = tool_set(&server, tool, cap)?;
        let call = agentfleet::llm::ToolUse { id: "toolu_1".into(), name: tool.into(), input: serde_json::json!({}) };
        let started = Instant::now();
        let ToolRun::Done(out, _) = set.run(&call, "s:toolu_1").await else { panic!("{tool}: not done") };
        assert!(!out.is_error, "{tool}: a cut answer is still an answer: {out:?}");
        let (head, marker) = out.content.split_once('…').expect("a marker");
        assert_eq!(head, "x".repeat(cap), "{tool}: the first {cap} bytes");
        assert_eq!(marker, format!(" [truncated: the first {cap} bytes of a response {total} are shown]"));
        // It stopped reading: 64 MiB (or forever) would take far longer than this.
        assert!(started.elapsed() < Duration::from_secs(5), "{tool} took {:?}", started.elapsed());
    }
    server.stop().await;
    Ok(())
}

#[tokio::test]
async fn a_session_whose_tool_answers_forever_goes_on() -> anyhow::Result<()> {
    let opts = FleetOptions::default();
    let config = |model: &str, tools: &str| config_text("bounded", &opts, model, tools) + &flood_config(tools);
    let rig = EngineRig::start(config, Arc::new(OpenGuard)).await?;
    for tool in ["endless_response", "huge_response"] {
        let id = rig.session("flooded", &format!("[steps=2 tool={tool}] read it all"), None)?;
        let s = rig.run(&id).await?;
        assert_eq!(s.meta.status, SessionStatus::Completed, "{tool}");
        let results: serde_json::Value = serde_json::from_str(&s.messages[2])?;
        let result = &results["content"][0];
        assert_eq!(result["type"], "tool_result", "{results}");
        let text = result["content"].as_str().or_else(|| result["content"][0]["text"].as_str()).unwrap_or_default();
        let cap = rig.cfg.worker.max_tool_result_bytes;
        assert!(text.starts_with(&"x".repeat(cap)) && text.len() < cap + 200, "{tool}: {} bytes", text.len());
        assert!(
            text.contains("[truncated: the first 32768 bytes of a response"),
            "{tool}: {}",
            text.get(cap..).unwrap_or(text)
        );
    }
    rig.stop().await;
    Ok(())
}

#[tokio::test]
async fn an_oversized_step_message_is_dead_lettered_unread() -> anyhow::Result<()> {
    let opts = FleetOptions::default();
    let rig = EngineRig::start(|model, tools| config_text("bounded", &opts, model, tools), Arc::new(OpenGuard)).await?;
    let id = rig.session("support", "[steps=2] padded", None)?;
    // A valid step message, padded with whitespace past the cap: it is refused for its size alone.
    let mut body = serde_json::to_vec(&StepMessage { session_id: id.clone(), step: 1, attempt: 0 })?;
    body.extend(std::iter::repeat_n(b' ', MAX_STEP_MESSAGE_BYTES));
    assert_eq!(rig.engine.handle(&body, &rig.pool).await, Disposition::Ack);
    let dead = rig.sent.sent().dead.clone();
    assert_eq!(dead.len(), 1, "{dead:?}");
    assert!(dead[0].starts_with("oversized: ") && dead[0].contains(&body.len().to_string()), "{}", dead[0]);
    assert_eq!(rig.snapshot(&id)?.meta.step, 1, "nothing ran");
    assert_eq!(rig.model.stats().answered_total, 0);
    rig.stop().await;
    Ok(())
}

/// A topology under a prefix of its own, and a channel to look at it.
struct Broker {
    cfg: AmqpConfig,
    topology: Topology,
    pool: Name,
    conn: lapin::Connection,
    ch: lapin::Channel,
}

impl Broker {
    async fn start() -> anyhow::Result<Self> {
        Self::start_with(|_| {}).await
    }

    async fn start_with(limits: impl FnOnce(&mut AmqpConfig)) -> anyhow::Result<Self> {
        let prefix = format!("t{}", ulid::Ulid::new().to_string().to_lowercase());
        let mut cfg = AmqpConfig { url: amqp_url(), prefix, ..AmqpConfig::default() };
        limits(&mut cfg);
        let conn = agentfleet::amqp::connect(&cfg.url, "bounded-test").await?;
        let ch = conn.create_channel().await?;
        Ok(Self { topology: Topology::from_config(&cfg), cfg, pool: Name::parse("default")?, conn, ch })
    }

    async fn publisher(&self) -> Result<AmqpPublisher, PublishError> {
        let patience = Duration::from_secs(60);
        AmqpPublisher::connect_patiently(
            &self.cfg.url,
            "bounded-test",
            self.topology.clone(),
            vec![self.pool.clone()],
            patience,
        )
        .await
    }

    /// Deletes every queue and exchange of the prefix (on a fresh channel: a refused declaration
    /// closes the one it was made on).
    async fn cleanup(self) -> anyhow::Result<()> {
        let t = &self.topology;
        let ch = self.conn.create_channel().await?;
        let delays = DELAY_TIERS.iter().map(|(tier, _)| t.delay(tier));
        let queues = [t.dead(), t.requests_queue(), t.step_queue(&self.pool)].into_iter().chain(delays.clone());
        for q in queues {
            let _ = ch.queue_delete(q.as_str().into(), QueueDeleteOptions::default()).await;
        }
        for e in [t.steps_exchange(), t.events_exchange(), t.dead()].into_iter().chain(delays) {
            let _ = ch.exchange_delete(e.as_str().into(), ExchangeDeleteOptions::default()).await;
        }
        let _ = self.conn.close(200, "done".into()).await;
        Ok(())
    }
}

#[tokio::test]
async fn a_step_postponed_for_3s_comes_back_in_about_3s() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    let publisher = broker.publisher().await?;
    let wait = Duration::from_secs(3);
    let tier = DELAY_TIERS.iter().find(|(name, _)| *name == delay_tier(wait)).map(|(_, ttl)| *ttl);
    assert_eq!(tier, Some(Duration::from_millis(3_350)), "3 s waits in the 3.35 s tier");
    let msg = StepMessage { session_id: SessionId::generate(), step: 1, attempt: 0 };
    let queue = broker.topology.step_queue(&broker.pool);
    let published = Instant::now();
    publisher.publish_step(&broker.pool, &msg, Some(wait)).await?;
    let (ch, queue) = (&broker.ch, queue.as_str());
    let body = eventually("the postponed step back in its queue", Duration::from_secs(20), || async move {
        let got = ch.basic_get(queue.into(), BasicGetOptions { no_ack: true }).await.ok()?;
        got.map(|m| m.delivery.data)
    })
    .await;
    let waited = published.elapsed();
    assert_eq!(StepMessage::parse(&body)?.session_id, msg.session_id);
    // Told 3 s, it waits 3 s (its own expiration, in the 3.35 s tier): never less than told, and
    // nowhere near the 30 s tier of old. (The upper bound leaves room for a loaded broker.)
    assert!(waited >= wait, "back after {waited:?}, sooner than the {wait:?} it was told");
    assert!(waited < Duration::from_secs(8), "back only after {waited:?}");
    broker.cleanup().await
}

#[tokio::test]
async fn a_queue_declared_with_other_arguments_stops_the_start_and_says_what_to_do() -> anyhow::Result<()> {
    let broker = Broker::start().await?;
    // The dead-letter queue as an older release declared it: quorum, no length limit.
    let mut old = FieldTable::default();
    old.insert("x-queue-type".into(), AMQPValue::LongString("quorum".as_bytes().to_vec().into()));
    let durable = QueueDeclareOptions { durable: true, ..Default::default() };
    broker.ch.queue_declare(broker.topology.dead().as_str().into(), durable, old).await?;
    let started = Instant::now();
    let refused = broker.publisher().await.err().expect("the declaration is refused");
    assert!(started.elapsed() < Duration::from_secs(10), "a mismatch is not retried ({:?})", started.elapsed());
    let PublishError::Topology(mismatch) = &refused else { panic!("not a topology mismatch: {refused}") };
    assert_eq!(mismatch.queue, broker.topology.dead());
    let limits = ["x-max-length", "x-max-length-bytes", "x-overflow"];
    assert!(limits.contains(&mismatch.argument.as_str()), "{mismatch}");
    let text = refused.to_string();
    let dead = broker.topology.dead();
    for part in [format!("`{dead}`"), mismatch.argument.clone(), format!("delete_queue {dead}"), "prefix".into()] {
        assert!(text.contains(&part), "`{part}` missing from: {text}");
    }
    broker.cleanup().await
}

#[tokio::test]
async fn full_queues_refuse_publishes_and_a_request_redelivered_too_often_is_dead_lettered() -> anyhow::Result<()> {
    let broker = Broker::start_with(|c| {
        c.requests_delivery_limit = 2;
        c.requests_max_length = 2;
        c.dead_max_length = 2;
    })
    .await?;
    let publisher = broker.publisher().await?;
    let (requests, dead) = (broker.topology.requests_queue(), broker.topology.dead());
    let props = lapin::BasicProperties::default().with_delivery_mode(2);

    // A request that fails every time it is handled (requeued): the broker dead-letters it.
    publisher.publish("", &requests, b"poison", props.clone()).await?;
    let mut deliveries = 0;
    while let Some(m) = broker.ch.basic_get(requests.as_str().into(), BasicGetOptions::default()).await? {
        deliveries += 1;
        assert!(deliveries <= 10, "the request is still delivered after {deliveries} deliveries");
        m.delivery.nack(lapin::options::BasicNackOptions { requeue: true, ..Default::default() }).await?;
    }
    let (ch, dead_queue) = (&broker.ch, dead.as_str());
    let poisoned = eventually("the poison request in the dead-letter queue", Duration::from_secs(20), || async move {
        ch.basic_get(dead_queue.into(), BasicGetOptions { no_ack: true }).await.ok()?
    })
    .await;
    assert_eq!(poisoned.delivery.data, b"poison");
    assert_eq!(death_reason(&poisoned.delivery.properties).as_deref(), Some("delivery_limit"));

    // The requests queue is full at 2, and so is the dead-letter queue: further publishes are
    // refused (nacked), not dropped. A quorum queue learns it is full a moment after the publish
    // that filled it, so a publish or two more may still go in: the limit is close, not exact.
    let accepted = publish_until_refused(|| publisher.publish("", &requests, b"{}", props.clone())).await;
    assert!((2..=5).contains(&accepted), "the requests queue took {accepted} requests before refusing");
    let accepted = publish_until_refused(|| publisher.dead_letter(b"bad", "malformed: test")).await;
    assert!((2..=5).contains(&accepted), "the dead-letter queue took {accepted} messages before refusing");
    broker.cleanup().await
}

/// Publishes until the broker refuses (nacks) a publish, a little apart; how many it took.
async fn publish_until_refused<F: Future<Output = Result<(), PublishError>>>(mut publish: impl FnMut() -> F) -> usize {
    for accepted in 0..50 {
        match publish().await {
            Ok(()) => tokio::time::sleep(Duration::from_millis(50)).await,
            Err(PublishError::Nacked) => return accepted,
            Err(e) => panic!("publish failed: {e}"),
        }
    }
    panic!("50 publishes into a queue limited to 2 were all accepted")
}

/// The `reason` of the first `x-death` entry RabbitMQ added when it dead-lettered a message.
fn death_reason(props: &lapin::BasicProperties) -> Option<String> {
    let deaths = props.headers().as_ref()?.inner().get("x-death")?.clone();
    let AMQPValue::FieldArray(deaths) = deaths else { return None };
    let AMQPValue::FieldTable(first) = deaths.as_slice().first()?.clone() else { return None };
    match first.inner().get("reason")? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        _ => None,
    }
}
