//! `GET /v1/sessions/{id}/events`: a running session's events as Server-Sent Events.
//!
//! A client reads part of the stream, drops the connection, and resumes with `Last-Event-ID` on
//! another dispatcher while the first one shuts down: it receives every trace record once, in
//! order, and the last event is `session.ended`. A resume from the end is answered 204.

use std::time::Duration;

use agentfleet_tests::fleet::{FleetOptions, TestFleet, TestToken};
use agentfleet_tests::model_server::Faults;
use anyhow::{Context as _, Result, ensure};
use eventsource_stream::{Event, Eventsource as _};
use futures::StreamExt as _;

/// How long a whole read may take.
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// Opens the stream of `id` at `api`, after `last` if given, and reads `limit` events (all, to the
/// end of the stream, when `None`). The HTTP status, and the events.
async fn read(
    fleet: &TestFleet,
    api: &str,
    id: &str,
    last: Option<&str>,
    limit: Option<usize>,
) -> Result<(u16, Vec<Event>)> {
    let mut request = fleet.http.get(format!("{api}/v1/sessions/{id}/events"));
    if let Some(last) = last {
        request = request.header("last-event-id", last);
    }
    let response = request.send().await?;
    let status = response.status().as_u16();
    if status != 200 {
        return Ok((status, Vec::new()));
    }
    let content_type = response.headers().get("content-type").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    ensure!(content_type.starts_with("text/event-stream"), "content-type {content_type}");
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    let reading = async {
        while let Some(event) = stream.next().await {
            events.push(event?);
            if limit.is_some_and(|n| events.len() >= n) {
                break;
            }
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(READ_TIMEOUT, reading).await.context("the stream did not end in time")??;
    Ok((status, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_resumes_on_another_dispatcher_with_every_event_once() -> Result<()> {
    let fleet = TestFleet::start(FleetOptions { workers: 1, ..FleetOptions::default() }).await?;
    // Slow enough that the stream is read while the session runs.
    fleet.model.set_faults(Faults { latency_ms: 150, ..Faults::default() });
    let id = fleet.submit("support", "[steps=6] follow me").await?;

    let (status, first) = read(&fleet, &fleet.api, id.as_str(), None, Some(3)).await?;
    ensure!(status == 200 && first.len() == 3, "{status} {first:?}");
    ensure!(first.iter().all(|e| e.event == "model_call" || e.event == "tool_call"), "{first:?}");
    let last = first.last().map(|e| e.id.clone()).unwrap_or_default();

    // The client's dispatcher goes away; it resumes on another one.
    let (other, stop_other) = fleet.another_dispatcher().await?;
    fleet.terminate_dispatcher();
    let (status, rest) = read(&fleet, &other, id.as_str(), Some(&last), None).await?;
    ensure!(status == 200, "{status}");
    let end = rest.last().context("nothing after the resume")?;
    ensure!(end.event == "session.ended", "the last event ends the session: {end:?}");
    let ended: serde_json::Value = serde_json::from_str(&end.data)?;
    ensure!(ended["status"] == "completed", "{ended}");
    ensure!(end.id == format!("{}-end", rest[rest.len() - 2].id), "{end:?}");

    // Every trace record once, in order: the stream's ids and actions are the trace's.
    let events: Vec<&Event> = first.iter().chain(&rest[..rest.len() - 1]).collect();
    let mut ids: Vec<&str> = events.iter().map(|e| e.id.as_str()).collect();
    let order = |id: &str| -> (u64, u64) {
        let (ms, seq) = id.split_once('-').unwrap_or(("0", "0"));
        (ms.parse().unwrap_or(0), seq.parse().unwrap_or(0))
    };
    ensure!(ids.windows(2).all(|w| order(w[0]) < order(w[1])), "ids strictly increase: {ids:?}");
    ids.dedup();
    ensure!(ids.len() == events.len(), "no event twice");
    let trace: serde_json::Value =
        fleet.http.get(format!("{other}/v1/sessions/{id}/trace")).send().await?.json().await?;
    let records = trace["records"].as_array().context("records")?;
    let actions: Vec<&str> = records.iter().filter_map(|r| r["action"].as_str()).collect();
    let streamed: Vec<&str> = events.iter().map(|e| e.event.as_str()).collect();
    ensure!(streamed == actions, "the stream is the trace: {streamed:?} vs {actions:?}");
    ensure!(actions.iter().filter(|a| **a == "model_call").count() == 6, "{actions:?}");
    for (event, record) in events.iter().zip(records) {
        ensure!(serde_json::from_str::<serde_json::Value>(&event.data)? == *record, "{event:?} vs {record}");
    }

    // From the end, nothing follows.
    let (status, after_end) = read(&fleet, &other, id.as_str(), Some(&end.id), None).await?;
    ensure!(status == 204 && after_end.is_empty(), "{status}");
    let (status, _) = read(&fleet, &other, id.as_str(), Some("not-an-id"), None).await?;
    ensure!(status == 400, "{status}");
    stop_other.cancel();
    fleet.cleanup().await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_stream_obeys_tokens_and_tenants() -> Result<()> {
    let tokens = vec![TestToken::new("reader", "elsewhere", &["read"])];
    let fleet = TestFleet::start(FleetOptions { workers: 0, tokens, ..FleetOptions::default() }).await?;
    let id = fleet.submit("support", "[steps=1] hello").await?;
    let url = format!("{}/v1/sessions/{id}/events", fleet.api);
    let anonymous = reqwest::Client::new().get(&url).send().await?;
    ensure!(anonymous.status() == 401, "{}", anonymous.status());
    // Another tenant's reader does not see the session at all.
    let other = fleet.client("reader").get(&url).send().await?;
    ensure!(other.status() == 404, "{}", other.status());
    let missing =
        fleet.http.get(format!("{}/v1/sessions/s_01M8T5EFNVV4MWTRH26T1DKF02/events", fleet.api)).send().await?;
    ensure!(missing.status() == 404, "{}", missing.status());
    fleet.cleanup().await
}

/// Opens `GET /v1/events?{query}` as `client`: once the answer's headers came, the stream is live
/// (the dispatcher answers after its queue is bound).
async fn open_live(api: &str, client: &reqwest::Client, query: &str) -> Result<reqwest::Response> {
    let response = client.get(format!("{api}/v1/events?{query}")).send().await?;
    ensure!(response.status() == 200, "GET /v1/events?{query}: {}", response.status());
    Ok(response)
}

/// Reads an open stream until `done` says the events so far are enough.
async fn read_until(response: reqwest::Response, done: impl Fn(&[Event]) -> bool) -> Result<Vec<Event>> {
    let mut stream = response.bytes_stream().eventsource();
    let mut events = Vec::new();
    let reading = async {
        while !done(&events) {
            let event = stream.next().await.context("the stream ended")??;
            events.push(event);
        }
        anyhow::Ok(())
    };
    tokio::time::timeout(READ_TIMEOUT, reading).await.context("the events did not come in time")??;
    Ok(events)
}

fn session_of(event: &Event) -> String {
    serde_json::from_str::<serde_json::Value>(&event.data)
        .ok()
        .and_then(|v| v["session_id"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// `GET /v1/events`: every session of the caller's tenant, live, filtered by agent and kind; an
/// admin sees every tenant, and nobody else sees another tenant's sessions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_tenant_stream_carries_every_session_of_the_tenant_and_no_other() -> Result<()> {
    let tokens = vec![
        TestToken::new("acme", "acme", &["submit", "read"]),
        TestToken::new("globex", "globex", &["submit", "read"]),
    ];
    let fleet = TestFleet::start(FleetOptions { workers: 1, tokens, ..FleetOptions::default() }).await?;
    let (acme, globex) = (fleet.client("acme"), fleet.client("globex"));
    let submit = |client: reqwest::Client, goal: &'static str| {
        let url = format!("{}/v1/sessions", fleet.api);
        async move {
            let body = serde_json::json!({ "agent": "support", "input": goal });
            let created: serde_json::Value = client.post(url).json(&body).send().await?.json().await?;
            anyhow::Ok(created["id"].as_str().context("no id")?.to_owned())
        }
    };

    // The streams are open before the sessions start: a session created first would be missed.
    let completed = |n: usize| move |e: &[Event]| e.iter().filter(|e| e.event == "session.completed").count() >= n;
    let acme_all = tokio::spawn(read_until(open_live(&fleet.api, &acme, "").await?, completed(2)));
    let acme_done = tokio::spawn(read_until(
        open_live(&fleet.api, &acme, "kind=session.completed&agent=support").await?,
        completed(2),
    ));
    let globex_all = tokio::spawn(read_until(open_live(&fleet.api, &globex, "").await?, completed(1)));
    let admin = tokio::spawn(read_until(open_live(&fleet.api, &fleet.http, "tenant=globex").await?, completed(1)));

    let a1 = submit(acme.clone(), "[steps=2] acme one").await?;
    let a2 = submit(acme.clone(), "[steps=1] acme two").await?;
    let g1 = submit(globex.clone(), "[steps=1] globex one").await?;

    let acme_events = acme_all.await??;
    let mine = [a1.as_str(), a2.as_str()];
    ensure!(
        acme_events.iter().all(|e| mine.contains(&session_of(e).as_str())),
        "only acme's sessions: {acme_events:?}"
    );
    for id in mine {
        let kinds: Vec<&str> = acme_events.iter().filter(|e| session_of(e) == id).map(|e| e.event.as_str()).collect();
        ensure!(
            kinds.first() == Some(&"session.created") && kinds.last() == Some(&"session.completed"),
            "{id}: {kinds:?}"
        );
    }
    let done = acme_done.await??;
    ensure!(done.iter().all(|e| e.event == "session.completed"), "{done:?}");
    let mut ids: Vec<String> = done.iter().map(session_of).collect();
    ids.sort();
    let mut want = mine.map(str::to_owned).to_vec();
    want.sort();
    ensure!(ids == want, "{ids:?} vs {want:?}");
    for events in [globex_all.await??, admin.await??] {
        ensure!(events.iter().all(|e| session_of(e) == g1), "only globex's session: {events:?}");
    }

    // Refused: no token, another tenant named by a non-admin, a kind that is none.
    let anonymous = reqwest::Client::new().get(format!("{}/v1/events", fleet.api)).send().await?;
    ensure!(anonymous.status() == 401, "{}", anonymous.status());
    let other = acme.get(format!("{}/v1/events?tenant=globex", fleet.api)).send().await?;
    ensure!(other.status() == 403, "{}", other.status());
    let bad = acme.get(format!("{}/v1/events?kind=completed", fleet.api)).send().await?;
    ensure!(bad.status() == 400, "{}", bad.status());
    fleet.cleanup().await
}
