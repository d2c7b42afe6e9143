//! Recovery after the broker restarts: workers and the dispatcher reconnect, and every session that
//! was in flight completes. Its own test binary, because it restarts the shared RabbitMQ node.

use std::process::Command;
use std::time::Duration;

use agentfleet::domain::SessionId;
use agentfleet_tests::fleet::{FleetOptions, TestFleet, check_step_conversation, eventually};
use agentfleet_tests::model_server::Faults;
use futures::future::try_join_all;

fn rabbitmqctl(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("rabbitmqctl").args(args).output()?;
    anyhow::ensure!(out.status.success(), "rabbitmqctl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    Ok(())
}

/// After a restart the node recovers its quorum queues for a while and may refuse declarations with
/// INTERNAL_ERROR; wait until a quorum queue can be declared, so later tests find a working broker.
async fn wait_until_queues_can_be_declared() -> anyhow::Result<()> {
    use lapin::options::{QueueDeclareOptions, QueueDeleteOptions};
    use lapin::types::{AMQPValue, FieldTable};
    let url = agentfleet_tests::fleet::amqp_url();
    let what = "the restarted broker to accept a quorum queue declaration";
    eventually(what, Duration::from_secs(60), || async {
        let probe = async {
            let conn = lapin::Connection::connect(&url, lapin::ConnectionProperties::default()).await?;
            let ch = conn.create_channel().await?;
            let mut args = FieldTable::default();
            args.insert("x-queue-type".into(), AMQPValue::LongString("quorum".as_bytes().to_vec().into()));
            let name = format!("restart-probe-{}", ulid::Ulid::new());
            ch.queue_declare(name.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
                .await?;
            ch.queue_delete(name.as_str().into(), QueueDeleteOptions::default()).await?;
            conn.close(200, "probe".into()).await?;
            Ok::<(), lapin::Error>(())
        };
        probe.await.ok()
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_complete_across_a_broker_restart() -> anyhow::Result<()> {
    let url = agentfleet_tests::fleet::amqp_url();
    assert!(
        url.contains("127.0.0.1") || url.contains("localhost"),
        "this test restarts the broker with rabbitmqctl, so AMQP_URL must name a local node, not {url}"
    );
    if let Err(e) = Command::new("rabbitmqctl").arg("-q").arg("status").output() {
        panic!("this test needs rabbitmqctl ({e}); `bash scripts/services.sh` installs and starts RabbitMQ with it");
    }
    let fleet = TestFleet::start(FleetOptions { workers: 2, concurrency: 8, ..Default::default() }).await?;
    fleet.model.set_faults(Faults { latency_ms: 100, ..Default::default() });
    let goals: Vec<String> = (0..60).map(|i| format!("[steps=5] restart job {i}")).collect();
    let ids: Vec<SessionId> = try_join_all(goals.iter().map(|g| fleet.submit("support", g))).await?;
    // Restart once the workers are busy: both have taken a full load of steps to the model.
    eventually("16 model calls before the restart", Duration::from_secs(30), || async {
        (fleet.model.stats().valid_total >= 16).then_some(())
    })
    .await;

    let mut in_flight = 0;
    for id in &ids {
        in_flight += usize::from(!agentfleet_tests::fleet::is_settled(&fleet.session(id).await?));
    }
    assert!(in_flight > 0, "every session finished before the restart: the test proves nothing");
    println!("{in_flight} of {} sessions in flight at the restart", ids.len());
    rabbitmqctl(&["stop_app"])?;
    // Not a wait for anything: the outage lasts 2 s, so the clients see their connections fail.
    tokio::time::sleep(Duration::from_secs(2)).await;
    rabbitmqctl(&["start_app"])?;
    rabbitmqctl(&["await_startup"])?;
    wait_until_queues_can_be_declared().await?;

    // The dispatcher's publisher reconnects too: a session created after the restart completes.
    let late = eventually("the dispatcher to accept a session after the restart", Duration::from_secs(10), || async {
        fleet.submit("support", "[steps=3] after the restart").await.ok()
    })
    .await;
    let mut all = ids.clone();
    all.push(late);
    let sessions = fleet.wait_settled(&all, Duration::from_secs(120)).await?;
    for s in &sessions[..ids.len()] {
        assert_eq!(s["status"], "completed", "{s}");
        check_step_conversation(s, 5).map_err(|e| anyhow::anyhow!("{e}: {}", s["id"]))?;
    }
    assert_eq!(sessions[ids.len()]["status"], "completed");
    fleet.cleanup().await?;
    wait_until_queues_can_be_declared().await
}
