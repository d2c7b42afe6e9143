//! Retention and listing against a real Redis: finished sessions expire with every key and leave
//! every index; live ones stay; `list` pages through per-tenant and per-status indexes with bounded
//! work, however many sessions share a millisecond; daily-cap counters expire after their day.

use std::collections::HashSet;
use std::time::Duration;

use agentfleet::budget::Limits;
use agentfleet::config::RedisConfig;
use agentfleet::domain::{MicroUsd, Name, SessionId, SessionStatus, StepMessage, TenantId};
use agentfleet::redis_conn::RedisConn;
use agentfleet::store::{AdminStore, Claim, DailyCaps, ListFilter, NewSession, RedisStore, StepStore};
use agentfleet_tests::fleet::{FleetOptions, TestFleet, delete_keys_under, redis_at, redis_url, try_eventually};
use serde_json::{Value, json};

/// A store of its own key prefix, and a plain connection to look at its keys.
async fn store(retention_ms: u64) -> anyhow::Result<(RedisStore, String, RedisConn)> {
    let prefix = format!("t{}", ulid::Ulid::new().to_string().to_lowercase());
    let cfg = RedisConfig { url: redis_url(), key_prefix: prefix.clone(), ..Default::default() };
    let store = RedisStore::connect(&cfg).await?.with_retention_ms(retention_ms);
    let conn = redis_at(&redis_url()).await?;
    Ok((store, prefix, conn))
}

async fn delete_keys(conn: &mut RedisConn, prefix: &str) -> anyhow::Result<()> {
    delete_keys_under(conn, prefix).await
}

fn new_session(tenant: Option<&str>) -> anyhow::Result<NewSession> {
    Ok(NewSession {
        id: SessionId::generate(),
        agent: Name::parse("support")?,
        tenant: tenant.map(TenantId::parse).transpose()?,
        messages: vec![agentfleet::llm::user_message("hello")],
        origin: None,
        metadata: json!({}),
        limits: Limits {
            max_steps: 5,
            max_cost: MicroUsd::new(1_000_000),
            max_cost_per_step: MicroUsd::new(100_000),
            max_tokens: 100_000,
            alert_permille: 800,
            summary_max_tokens: 512,
        },
        callback_url: None,
        first_call: None,
    })
}

/// Every page of a listing, following the cursor; fails on a loop.
async fn list_all(store: &RedisStore, filter: &ListFilter, limit: usize) -> anyhow::Result<Vec<SessionId>> {
    let (mut out, mut cursor, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let (rows, next) = store.list(filter, cursor.as_deref(), limit).await?;
        out.extend(rows.into_iter().map(|(id, _)| id));
        pages += 1;
        anyhow::ensure!(pages <= 1_000, "the listing did not end after {pages} pages");
        match next {
            Some(c) => {
                anyhow::ensure!(cursor.as_ref() != Some(&c), "the cursor did not move: {c}");
                cursor = Some(c);
            }
            None => return Ok(out),
        }
    }
}

async fn zcard(conn: &mut RedisConn, key: &str) -> anyhow::Result<u64> {
    Ok(redis::cmd("ZCARD").arg(key).query_async(conn).await?)
}

const SESSION_KEYS: [&str; 7] = ["meta", "msgs", "usage", "ledger", "trace", "lease", "resv"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_sharing_a_millisecond_list_once_each_from_their_tenant_and_status_index() -> anyhow::Result<()> {
    let (store, prefix, mut conn) = store(60_000).await?;
    let now = 1_790_000_000_000;
    let mut acme = HashSet::new();
    for _ in 0..250 {
        let s = new_session(Some("acme"))?;
        assert!(store.create(&s, now).await?);
        acme.insert(s.id);
    }
    // Newer than all of acme's: a listing that scanned every session would spend its reads on these.
    let mut beta = HashSet::new();
    for _ in 0..300 {
        let s = new_session(Some("beta"))?;
        assert!(store.create(&s, now + 1).await?);
        beta.insert(s.id);
    }
    let untenanted = new_session(None)?;
    store.create(&untenanted, now).await?;

    for limit in [1, 7, 50, 500] {
        let tenant = Some(TenantId::parse("acme")?);
        let ids = list_all(&store, &ListFilter { tenant, ..Default::default() }, limit).await?;
        assert_eq!(ids.len(), 250, "limit {limit}: every session once");
        assert_eq!(ids.iter().collect::<HashSet<_>>().len(), 250, "limit {limit}: no duplicates");
        assert!(ids.iter().all(|id| acme.contains(id)), "limit {limit}: only acme's sessions");
    }
    let everything = list_all(&store, &ListFilter::default(), 100).await?;
    assert_eq!(everything.len(), 551);
    assert_eq!(everything.iter().collect::<HashSet<_>>().len(), 551);
    assert!(everything[..300].iter().all(|id| beta.contains(id)), "newest first");

    // One acme session, a status no other has: found in one call, with no cursor, though 300 newer
    // sessions of beta and 249 of acme are in other indexes (one call reads at most 100 sessions).
    let chosen = acme.iter().next().cloned().unwrap_or_else(SessionId::generate);
    store.cancel(&chosen, now).await?;
    store.reindex(&chosen, now).await?;
    let filter = ListFilter {
        tenant: Some(TenantId::parse("acme")?),
        status: Some(SessionStatus::Cancelled),
        ..Default::default()
    };
    let acme_only = ListFilter { tenant: Some(TenantId::parse("acme")?), ..Default::default() };
    let (rows, _) = store.list(&acme_only, None, 2).await?;
    assert_eq!(rows.len(), 2, "acme's newest, not a page spent on beta's");
    let (rows, next) = store.list(&filter, None, 2).await?;
    assert_eq!(rows.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![&chosen]);
    assert_eq!(next, None);
    let (rows, next) = store.list(&ListFilter { tenant: Some(TenantId::parse("beta")?), ..filter }, None, 2).await?;
    assert!(rows.is_empty() && next.is_none(), "beta has no cancelled session");

    // Queued sessions come from the live index; the cancelled one has left it.
    let queued = ListFilter {
        tenant: Some(TenantId::parse("acme")?),
        status: Some(SessionStatus::Queued),
        ..Default::default()
    };
    let ids = list_all(&store, &queued, 60).await?;
    assert_eq!(ids.len(), 249);
    assert!(!ids.contains(&chosen));
    assert_eq!(zcard(&mut conn, &format!("{prefix}:ix:tenant:acme:status:live")).await?, 249);

    // A page cut short by its read budget still has a cursor, and the cursor goes on.
    let agent = ListFilter { agent: Some("nobody".into()), ..Default::default() };
    let (rows, next) = store.list(&agent, None, 10).await?;
    assert!(rows.is_empty());
    assert!(next.is_some(), "the budget of one call ran out before the index did");
    assert!(list_all(&store, &agent, 10).await?.is_empty());

    // A created_before bound at the shared millisecond keeps only what came before it.
    let before = ListFilter { created_before_ms: Some(now + 1), ..Default::default() };
    assert_eq!(list_all(&store, &before, 100).await?.len(), 251);
    let after = ListFilter { created_after_ms: Some(now + 1), ..Default::default() };
    assert_eq!(list_all(&store, &after, 100).await?.len(), 300);

    // A cursor that is not one is refused.
    for bad in ["12", "x:s_01", "99999999999999999999:s_01"] {
        assert!(store.list(&ListFilter::default(), Some(bad), 10).await.is_err(), "{bad}");
    }
    delete_keys(&mut conn, &prefix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ended_session_expires_and_the_janitor_sweep_forgets_it() -> anyhow::Result<()> {
    let (store, prefix, mut conn) = store(300).await?;
    let now = agentfleet::telemetry::now_ms();
    let ended = new_session(Some("acme"))?;
    let live = new_session(Some("acme"))?;
    store.create(&ended, now).await?;
    store.create(&live, now).await?;
    store.activate(&ended.id, now).await?;
    store.cancel(&ended.id, now).await?;
    store.append_trace(&ended.id, "{}").await?;
    store.reindex(&ended.id, now).await?;

    let meta = format!("{prefix}:{{{}}}:meta", ended.id);
    let ttl: i64 = redis::cmd("PTTL").arg(&meta).query_async(&mut conn).await?;
    assert!((1..=300).contains(&ttl), "the ended session's meta expires: {ttl}");
    let ttl: i64 = redis::cmd("PTTL").arg(format!("{prefix}:{{{}}}:trace", ended.id)).query_async(&mut conn).await?;
    assert!((1..=300).contains(&ttl), "and its trace: {ttl}");
    // The live one runs a step: it stays in the live index and keeps its keys.
    let msg = StepMessage { session_id: live.id.clone(), step: 1, attempt: 0 };
    assert!(matches!(store.claim(&msg, "1|w|n", 10_000, now).await?, Claim::Run(_)));
    store.reindex(&live.id, now).await?;
    for what in ["meta", "msgs", "usage", "lease"] {
        let ttl: i64 =
            redis::cmd("PTTL").arg(format!("{prefix}:{{{}}}:{what}", live.id)).query_async(&mut conn).await?;
        let expected = if what == "lease" { (1..=10_000).contains(&ttl) } else { ttl == -1 };
        assert!(expected, "a running session's {what} does not expire: {ttl}");
    }
    assert_eq!(zcard(&mut conn, &format!("{prefix}:active")).await?, 0, "the ended session left the live index");

    let forgotten = try_eventually("the sweep to forget the ended session", Duration::from_secs(10), || async {
        let n = store.purge_expired(agentfleet::telemetry::now_ms(), 500).await?;
        Ok((n > 0).then_some(n))
    })
    .await?;
    assert_eq!(forgotten, 1);
    for what in SESSION_KEYS {
        let n: i64 =
            redis::cmd("EXISTS").arg(format!("{prefix}:{{{}}}:{what}", ended.id)).query_async(&mut conn).await?;
        assert_eq!(n, 0, "{what} is gone");
    }
    for index in ["ix:all", "ix:tenant:acme", "ix:status:live", "ix:tenant:acme:status:live"] {
        assert_eq!(zcard(&mut conn, &format!("{prefix}:{index}")).await?, 1, "{index} holds the live session only");
    }
    for index in ["ix:status:cancelled", "ix:tenant:acme:status:cancelled", "ix:retired"] {
        assert_eq!(zcard(&mut conn, &format!("{prefix}:{index}")).await?, 0, "{index} is empty");
    }
    let running = ListFilter { status: Some(SessionStatus::Running), ..Default::default() };
    let (rows, _) = store.list(&running, None, 10).await?;
    assert_eq!(rows.iter().map(|(id, _)| id).collect::<Vec<_>>(), vec![&live.id]);
    delete_keys(&mut conn, &prefix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_from_before_the_indexes_is_indexed_and_given_its_retention() -> anyhow::Result<()> {
    let (store, prefix, mut conn) = store(60_000).await?;
    let now = agentfleet::telemetry::now_ms();
    let old = new_session(None)?;
    store.create(&old, now).await?;
    // As the previous version left it: no `indexed` field, no listing index, only `sessions`.
    let meta = format!("{prefix}:{{{}}}:meta", old.id);
    let _: i64 = redis::cmd("HDEL").arg(&meta).arg("indexed").query_async(&mut conn).await?;
    let _: i64 = redis::cmd("HSET").arg(&meta).arg("status").arg("completed").query_async(&mut conn).await?;
    let _: i64 = redis::cmd("DEL").arg(format!("{prefix}:ix:all")).query_async(&mut conn).await?;
    let _: i64 = redis::cmd("DEL").arg(format!("{prefix}:ix:status:live")).query_async(&mut conn).await?;
    let _: i64 = redis::cmd("ZADD")
        .arg(format!("{prefix}:sessions"))
        .arg(now)
        .arg(old.id.as_str())
        .query_async(&mut conn)
        .await?;

    assert_eq!(store.purge_expired(now, 500).await?, 1);
    assert_eq!(zcard(&mut conn, &format!("{prefix}:sessions")).await?, 0, "the old index is emptied");
    assert_eq!(zcard(&mut conn, &format!("{prefix}:ix:status:completed")).await?, 1);
    let ttl: i64 = redis::cmd("PTTL").arg(&meta).query_async(&mut conn).await?;
    assert!((1..=60_000).contains(&ttl), "the finished session's retention started: {ttl}");
    let filter = ListFilter { status: Some(SessionStatus::Completed), ..Default::default() };
    assert_eq!(list_all(&store, &filter, 10).await?, vec![old.id]);
    delete_keys(&mut conn, &prefix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_daily_counter_expires_after_its_day_whoever_writes_it() -> anyhow::Result<()> {
    let (store, prefix, mut conn) = store(60_000).await?;
    let now_s = agentfleet::telemetry::now_ms() / 1000;
    let day = now_s / 86_400;
    let end_of_day_plus_margin = (day + 3) * 86_400;
    let tenant = TenantId::parse("acme")?;
    let caps = DailyCaps { agent: "support", tenant: Some(&tenant), day, agent_cap: None, tenant_cap: None };
    let agent_key = format!("{prefix}:daily:{{agent:support}}:{day}");
    let tenant_key = format!("{prefix}:daily:{{tenant:acme}}:{day}");

    store.daily_reserve(&caps, 1_000).await?;
    for key in [&agent_key, &tenant_key, &format!("{agent_key}:held")] {
        let at: i64 = redis::cmd("EXPIRETIME").arg(key).query_async(&mut conn).await?;
        assert_eq!(at, end_of_day_plus_margin as i64, "{key} expires two days after its day");
    }
    // A counter written without an expiry (by an older version) gets one at its next write.
    let _: i64 = redis::cmd("PERSIST").arg(&agent_key).query_async(&mut conn).await?;
    store.daily_settle(&caps, 1_000, 600).await?;
    // What the worker holds (its allowance, the correction) is written back.
    store.flush().await?;
    let at: i64 = redis::cmd("EXPIRETIME").arg(&agent_key).query_async(&mut conn).await?;
    assert_eq!(at, end_of_day_plus_margin as i64);
    assert_eq!(store.daily_spend("support", "acme", day).await?, (600, 600));
    for key in [&agent_key, &tenant_key] {
        let held: i64 = redis::cmd("GET").arg(format!("{key}:held")).query_async(&mut conn).await?;
        assert_eq!(held, 0, "{key}: nothing is held once the call is settled and the allowance given back");
    }
    // A settle never makes a counter that is not there (it would have no reservation behind it).
    let yesterday = DailyCaps { day: day - 1, ..caps };
    store.daily_settle(&yesterday, 0, 5).await?;
    store.flush().await?;
    let n: i64 = redis::cmd("EXISTS")
        .arg(format!("{prefix}:daily:{{agent:support}}:{}", day - 1))
        .query_async(&mut conn)
        .await?;
    assert_eq!(n, 0);
    delete_keys(&mut conn, &prefix).await
}

/// The ids of a listing page through the API.
async fn api_list(fleet: &TestFleet, query: &str) -> anyhow::Result<Vec<String>> {
    let page: Value = fleet.http.get(format!("{}/v1/sessions?{query}", fleet.api)).send().await?.json().await?;
    let rows = page["sessions"].as_array().cloned().unwrap_or_default();
    Ok(rows.iter().filter_map(|r| r["id"].as_str().map(str::to_owned)).collect())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finished_sessions_leave_the_fleet_after_the_retention_and_waiting_ones_stay() -> anyhow::Result<()> {
    let opts = FleetOptions { extra_config: "[sessions]\nretention_ms = 1500\n".into(), ..Default::default() };
    let fleet = TestFleet::start(opts).await?;
    let p = fleet.config.redis.key_prefix.clone();
    let mut redis = fleet.redis().await?;
    let mut done = Vec::new();
    for i in 0..3 {
        done.push(
            fleet
                .submit_json(&json!({"agent": "support", "input": format!("[steps=2] #{i}"), "tenant": "acme"}))
                .await?,
        );
    }
    let waiting =
        fleet.submit_json(&json!({"agent": "support", "input": "[refund=150] big", "tenant": "acme"})).await?;
    let settled = fleet.wait_settled(&done, Duration::from_secs(60)).await?;
    assert!(settled.iter().all(|s| s["status"] == "completed"), "{settled:?}");
    fleet.wait_status(&waiting, "awaiting_approval").await?;
    assert_eq!(api_list(&fleet, "tenant=acme&status=awaiting_approval").await?, vec![waiting.to_string()]);

    // The janitor (every second in the test fleet) forgets them once the keys have expired.
    try_eventually("the finished sessions to leave the listing", Duration::from_secs(30), || async {
        let listed = api_list(&fleet, "tenant=acme").await?;
        Ok((listed == vec![waiting.to_string()]).then_some(()))
    })
    .await?;
    try_eventually("every index to shrink to the waiting session", Duration::from_secs(30), || async {
        let mut redis = fleet.redis().await?;
        let mut sizes = Vec::new();
        for index in
            ["ix:all", "ix:tenant:acme", "ix:status:completed", "ix:tenant:acme:status:completed", "ix:retired"]
        {
            sizes.push(zcard(&mut redis, &format!("{p}:{index}")).await?);
        }
        Ok((sizes == [1, 1, 0, 0, 0]).then_some(()))
    })
    .await?;
    for id in &done {
        for what in SESSION_KEYS {
            let n: i64 = redis::cmd("EXISTS").arg(format!("{p}:{{{id}}}:{what}")).query_async(&mut redis).await?;
            assert_eq!(n, 0, "{id} {what} is gone");
        }
        let status = fleet.http.get(format!("{}/v1/sessions/{id}", fleet.api)).send().await?.status();
        assert_eq!(status, reqwest::StatusCode::NOT_FOUND);
    }
    let ttl: i64 = redis::cmd("PTTL").arg(format!("{p}:{{{waiting}}}:meta")).query_async(&mut redis).await?;
    assert_eq!(ttl, -1, "a waiting session does not expire");
    assert_eq!(fleet.session(&waiting).await?["status"], "awaiting_approval");
    assert_eq!(zcard(&mut redis, &format!("{p}:ix:tenant:acme:status:awaiting_approval")).await?, 1);
    fleet.cleanup().await
}
