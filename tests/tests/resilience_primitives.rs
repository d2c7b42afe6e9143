//! The fleet-wide circuit breaker and token buckets against the real Redis at `REDIS_URL`, with
//! several "workers" on separate connections and a simulated clock. Each test has its own key prefix.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfleet::breaker::{BreakerConfig, BreakerStatus, Breakers, Permit, Transition};
use agentfleet::ratelimit::{Acquire, RateHeaders, RateLimit, RateLimiter, Tokens};
use futures::future::join_all;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};

/// An arbitrary start of simulated time (Unix ms).
const T0: u64 = 1_700_000_000_000;

fn redis_url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A connection of its own, as each worker process has.
async fn connect() -> anyhow::Result<ConnectionManager> {
    let cfg = ConnectionManagerConfig::new().set_response_timeout(Some(Duration::from_secs(10)));
    Ok(redis::Client::open(redis_url())?.get_connection_manager_with_config(cfg).await?)
}

fn fresh_prefix() -> String {
    format!("t{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Deletes every key under `prefix`.
async fn cleanup(prefix: &str) -> anyhow::Result<()> {
    let mut conn = connect().await?;
    let mut cursor = 0_u64;
    loop {
        let (next, keys): (u64, Vec<String>) =
            redis::cmd("SCAN").arg(cursor).arg("MATCH").arg(format!("{prefix}:*")).query_async(&mut conn).await?;
        if !keys.is_empty() {
            let _: i64 = redis::cmd("DEL").arg(&keys).query_async(&mut conn).await?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}

fn nz(n: u32) -> anyhow::Result<NonZeroU32> {
    NonZeroU32::new(n).ok_or_else(|| anyhow::anyhow!("zero"))
}

async fn pttl(key: &str) -> anyhow::Result<i64> {
    Ok(redis::cmd("PTTL").arg(key).query_async(&mut connect().await?).await?)
}

/// `n` breaker clients ("workers"), each on its own connection.
async fn breaker_workers(prefix: &str, n: usize) -> anyhow::Result<Vec<Breakers>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(Breakers::new(connect().await?, prefix));
    }
    Ok(out)
}

/// `n` rate-limiter clients, each on its own connection.
async fn limiter_workers(prefix: &str, n: usize) -> anyhow::Result<Vec<RateLimiter>> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(RateLimiter::new(connect().await?, prefix));
    }
    Ok(out)
}

fn cfg(threshold: u32, cool_down: Duration, probe_timeout: Option<Duration>) -> anyhow::Result<BreakerConfig> {
    Ok(BreakerConfig { failure_threshold: nz(threshold)?, cool_down, probe_timeout })
}

/// Fails `threshold` calls from worker 0 at `now`, which must open the breaker.
async fn open_breaker(b: &Breakers, name: &str, cfg: &BreakerConfig, now: u64) -> anyhow::Result<()> {
    let mut last = None;
    for _ in 0..cfg.failure_threshold.get() {
        last = b.record(name, cfg, false, false, now).await?;
    }
    anyhow::ensure!(last == Some(Transition::Opened), "the breaker did not open: {last:?}");
    Ok(())
}

/// `per_worker` concurrent checks from every worker at `now`.
async fn checks(
    workers: &[Breakers],
    name: &str,
    cfg: &BreakerConfig,
    now: u64,
    per_worker: usize,
) -> anyhow::Result<Vec<Permit>> {
    let calls = workers.iter().flat_map(|b| (0..per_worker).map(move |_| b.check(name, cfg, now)));
    Ok(join_all(calls).await.into_iter().collect::<Result<Vec<_>, _>>()?)
}

fn probes(permits: &[Permit]) -> usize {
    permits.iter().filter(|p| p.is_probe()).count()
}

#[tokio::test]
async fn the_nth_failure_counted_across_workers_opens_the_breaker() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 4).await?;
    let cfg = cfg(5, Duration::from_secs(60), None)?;

    // Four failures spread over four workers: one short of the threshold, not one per worker.
    for (i, b) in workers.iter().enumerate() {
        assert_eq!(b.record("tool:crm", &cfg, false, false, T0 + i as u64).await?, None);
    }
    for b in &workers {
        assert_eq!(b.check("tool:crm", &cfg, T0 + 10).await?, Permit::Allow);
    }
    assert_eq!(workers[0].state("tool:crm", T0 + 10).await?.consecutive_failures, 4);

    // A success anywhere resets the run; a closed breaker without failures leaves no key.
    assert_eq!(workers[2].record("tool:crm", &cfg, false, true, T0 + 20).await?, None);
    let state = workers[1].state("tool:crm", T0 + 20).await?;
    assert_eq!((state.status, state.consecutive_failures), (BreakerStatus::Closed, 0));
    assert_eq!(pttl(&workers[0].key("tool:crm")).await?, -2);

    // Four more interleaved failures keep it closed; the fifth, from any worker, opens it.
    for (i, b) in workers.iter().enumerate() {
        assert_eq!(b.record("tool:crm", &cfg, false, false, T0 + 30 + i as u64).await?, None);
    }
    assert_eq!(workers[1].record("tool:crm", &cfg, false, false, T0 + 40).await?, Some(Transition::Opened));
    assert!(!workers[3].check("tool:crm", &cfg, T0 + 41).await?.is_allowed());
    assert!(pttl(&workers[0].key("tool:crm")).await? > 60_000);

    // Twenty failures at once from four workers: exactly one of them opens it, and the count stops
    // at the threshold (later failures land on an open breaker and are ignored).
    let cfg = &cfg;
    let calls = workers.iter().flat_map(|b| (0..5).map(move |_| b.record("model:anthropic", cfg, false, false, T0)));
    let transitions = join_all(calls).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    assert_eq!(transitions.iter().filter(|t| **t == Some(Transition::Opened)).count(), 1);
    assert_eq!(transitions.iter().filter(|t| t.is_some()).count(), 1);
    let state = workers[0].state("model:anthropic", T0).await?;
    assert_eq!((state.status, state.consecutive_failures), (BreakerStatus::Open, 5));

    cleanup(&prefix).await
}

#[tokio::test]
async fn an_open_breaker_denies_for_the_rest_of_its_cool_down() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 2).await?;
    let cfg = cfg(3, Duration::from_secs(60), None)?;
    open_breaker(&workers[0], "tool:erp", &cfg, T0).await?;

    let retry_after = Duration::from_secs(50);
    assert_eq!(workers[1].check("tool:erp", &cfg, T0 + 10_000).await?, Permit::Deny { retry_after });
    let state = workers[1].state("tool:erp", T0 + 30_000).await?;
    assert_eq!(state.status, BreakerStatus::Open);
    assert_eq!(state.retry_after, Some(Duration::from_secs(30)));

    // Outcomes of calls that started before it opened change nothing: no longer cool-down.
    assert_eq!(workers[1].record("tool:erp", &cfg, false, false, T0 + 20_000).await?, None);
    assert_eq!(workers[1].record("tool:erp", &cfg, false, true, T0 + 21_000).await?, None);
    let retry_after = Duration::from_millis(1);
    assert_eq!(workers[0].check("tool:erp", &cfg, T0 + 59_999).await?, Permit::Deny { retry_after });
    assert_eq!(workers[0].state("tool:erp", T0 + 59_999).await?.consecutive_failures, 3);
    assert_eq!(workers[1].state("tool:erp", T0 + 60_000).await?.status, BreakerStatus::HalfOpen);

    cleanup(&prefix).await
}

#[tokio::test]
async fn after_the_cool_down_exactly_one_caller_probes() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 5).await?;
    let cfg = cfg(5, Duration::from_secs(60), None)?;
    open_breaker(&workers[0], "model:anthropic", &cfg, T0).await?;

    // Thirty concurrent checks the moment the cool-down ends: one probe, everyone else waits for it.
    let t1 = T0 + 60_000;
    let permits = checks(&workers, "model:anthropic", &cfg, t1, 6).await?;
    assert_eq!(permits.len(), 30);
    assert_eq!(probes(&permits), 1);
    let probe_slot = Permit::Deny { retry_after: cfg.effective_probe_timeout() };
    assert!(permits.iter().all(|p| p.is_probe() || *p == probe_slot), "{permits:?}");

    // Calls that began before the breaker opened do not answer the probe's question.
    let name = "model:anthropic";
    assert_eq!(workers[1].record(name, &cfg, false, true, t1 + 100).await?, None);
    assert_eq!(workers[1].record(name, &cfg, false, false, t1 + 100).await?, None);
    assert_eq!(workers[2].state(name, t1 + 100).await?.status, BreakerStatus::HalfOpen);

    // The probe fails: another full cool-down.
    let t2 = t1 + 500;
    assert_eq!(workers[3].record(name, &cfg, true, false, t2).await?, Some(Transition::Reopened));
    let retry_after = Duration::from_millis(59_999);
    assert_eq!(workers[4].check(name, &cfg, t2 + 1).await?, Permit::Deny { retry_after });
    let state = workers[4].state(name, t2 + 1).await?;
    assert_eq!((state.status, state.consecutive_failures), (BreakerStatus::Open, 6));

    // After it, one probe again; its success closes the breaker and resets the count.
    let t3 = t2 + 60_000;
    let permits = checks(&workers, name, &cfg, t3, 6).await?;
    assert_eq!(probes(&permits), 1);
    assert_eq!(workers[0].record(name, &cfg, true, true, t3 + 200).await?, Some(Transition::Closed));
    let permits = checks(&workers, name, &cfg, t3 + 201, 2).await?;
    assert!(permits.iter().all(|p| *p == Permit::Allow), "{permits:?}");
    let state = workers[2].state(name, t3 + 201).await?;
    assert_eq!((state.status, state.consecutive_failures, state.retry_after), (BreakerStatus::Closed, 0, None));

    cleanup(&prefix).await
}

#[tokio::test]
async fn an_abandoned_probe_expires_and_another_is_let_through() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 3).await?;
    let cfg = cfg(2, Duration::from_secs(30), Some(Duration::from_secs(5)))?;
    open_breaker(&workers[0], "tool:mail", &cfg, T0).await?;

    // Worker 0 takes the probe and dies without reporting.
    let t1 = T0 + 30_000;
    assert_eq!(workers[0].check("tool:mail", &cfg, t1).await?, Permit::Probe);
    let retry_after = Duration::from_millis(1);
    assert_eq!(workers[1].check("tool:mail", &cfg, t1 + 4_999).await?, Permit::Deny { retry_after });

    // Once its slot expires, exactly one of the survivors probes.
    let permits = checks(&workers[1..], "tool:mail", &cfg, t1 + 5_000, 5).await?;
    assert_eq!(permits.len(), 10);
    assert_eq!(probes(&permits), 1);
    assert_eq!(workers[2].record("tool:mail", &cfg, true, true, t1 + 5_100).await?, Some(Transition::Closed));
    assert_eq!(workers[1].check("tool:mail", &cfg, t1 + 5_101).await?, Permit::Allow);

    cleanup(&prefix).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_workers_never_exceed_the_rate_plus_the_burst_in_any_minute() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = limiter_workers(&prefix, 3).await?;
    // 600 requests a minute, a bucket of 10 s worth: a burst of 100.
    let limit = RateLimit { requests_per_minute: Some(nz(600)?), burst_seconds: nz(10)?, ..Default::default() };
    let (minutes, tick_ms, burst) = (3_u64, 50_u64, 100_usize);
    let ticks = minutes * 60_000 / tick_ms;
    let grants = Arc::new(Mutex::new(Vec::new()));
    let barrier = Arc::new(tokio::sync::Barrier::new(workers.len()));

    // Each worker hammers the limiter every tick of simulated time; the barrier keeps the clock
    // monotonic across workers, while the calls within a tick race.
    let tasks = workers.into_iter().map(|limiter| {
        let (limit, grants, barrier) = (limit.clone(), grants.clone(), barrier.clone());
        tokio::spawn(async move {
            for tick in 0..ticks {
                let now = T0 + tick * tick_ms;
                for _ in 0..5 {
                    match limiter.acquire("anthropic:claude", &limit, 1, Tokens::default(), now).await? {
                        Acquire::Granted => grants.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.push(now - T0),
                        Acquire::Wait { retry_after } => {
                            anyhow::ensure!(retry_after <= Duration::from_millis(100), "{retry_after:?}");
                            break;
                        }
                    }
                }
                barrier.wait().await;
            }
            anyhow::Ok(())
        })
    });
    for task in join_all(tasks).await {
        task??;
    }

    let mut times = grants.lock().map_err(|_| anyhow::anyhow!("poisoned"))?.clone();
    times.sort_unstable();
    let ceiling = 600 * minutes as usize + burst;
    assert!(times.len() <= ceiling, "{} grants in {minutes} minutes", times.len());
    assert!(times.len() >= ceiling - 10, "only {} grants: the limiter is too strict", times.len());
    let busiest = (0..times.len()).map(|i| times[i..].partition_point(|&t| t < times[i] + 60_000)).max();
    assert!(busiest <= Some(600 + burst), "{busiest:?} grants in one minute");
    assert!(busiest >= Some(600 + burst - 5), "{busiest:?}: the burst was not used");

    cleanup(&prefix).await
}

/// 60 requests, 60 000 input tokens a minute, 10 s bursts: buckets of 10 requests and 10 000 tokens,
/// refilled at 1 request and 1 000 tokens a second. Output tokens unlimited.
fn small_limit() -> anyhow::Result<RateLimit> {
    Ok(RateLimit {
        requests_per_minute: Some(nz(60)?),
        input_tokens_per_minute: NonZeroU64::new(60_000),
        output_tokens_per_minute: None,
        burst_seconds: nz(10)?,
    })
}

fn input(n: u64) -> Tokens {
    Tokens { input: n, output: 0 }
}

fn wait_ms(ms: u64) -> Acquire {
    Acquire::Wait { retry_after: Duration::from_millis(ms) }
}

#[tokio::test]
async fn a_call_is_granted_by_every_bucket_or_by_none() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let rl = RateLimiter::new(connect().await?, &prefix);
    let (limit, key) = (small_limit()?, "anthropic:claude-haiku");

    assert_eq!(rl.acquire(key, &limit, 1, input(4_000), T0).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, 1, input(4_000), T0).await?, Acquire::Granted);
    // 2 000 tokens left, 2 000 short at 1 000 a second.
    assert_eq!(rl.acquire(key, &limit, 1, input(4_000), T0).await?, wait_ms(2_000));
    // The refused call took no request: 8 of 10 remain. Unlimited output tokens are not counted.
    let huge_output = Tokens { input: 0, output: 1_000_000_000 };
    for _ in 0..8 {
        assert_eq!(rl.acquire(key, &limit, 1, huge_output, T0).await?, Acquire::Granted);
    }
    assert_eq!(rl.acquire(key, &limit, 1, Tokens::default(), T0).await?, wait_ms(1_000));
    assert_eq!(rl.acquire(key, &limit, 1, input(4_000), T0 + 2_000).await?, Acquire::Granted);
    // The key lives until the buckets would be full again, plus a minute.
    let ttl = pttl(&rl.key(key)).await?;
    assert!((60_000..=80_000).contains(&ttl), "{ttl}");

    // No limits at all: granted without touching Redis.
    let unlimited = RateLimit::default();
    assert_eq!(rl.acquire("other:model", &unlimited, 1_000, input(u64::MAX), T0).await?, Acquire::Granted);
    assert_eq!(pttl(&rl.key("other:model")).await?, -2);

    cleanup(&prefix).await
}

#[tokio::test]
async fn settling_takes_or_gives_back_the_difference() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let rl = RateLimiter::new(connect().await?, &prefix);
    let (limit, key) = (small_limit()?, "anthropic:claude-sonnet");

    // Estimated 8 000, used 3 000: 5 000 come back, 7 000 are left.
    assert_eq!(rl.acquire(key, &limit, 1, input(8_000), T0).await?, Acquire::Granted);
    rl.settle(key, &limit, input(8_000), input(3_000), T0).await?;
    assert_eq!(rl.acquire(key, &limit, 1, input(7_000), T0).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, 1, input(1), T0).await?, wait_ms(1));

    // Estimated 7 000, used 17 000: a debt of 10 000 that the refill repays first.
    rl.settle(key, &limit, input(7_000), input(17_000), T0).await?;
    assert_eq!(rl.acquire(key, &limit, 1, input(1_000), T0).await?, wait_ms(11_000));

    // A refund never fills a bucket beyond its capacity.
    let t1 = T0 + 60_000;
    rl.settle(key, &limit, input(5_000), input(0), t1).await?;
    assert_eq!(rl.acquire(key, &limit, 1, input(10_000), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, 1, input(1), t1).await?, wait_ms(1));

    // A call larger than the bucket goes through once it is full, and leaves a debt behind.
    let t2 = t1 + 60_000;
    assert_eq!(rl.acquire(key, &limit, 1, input(25_000), t2).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, 1, input(1), t2).await?, wait_ms(15_001));

    cleanup(&prefix).await
}

#[tokio::test]
async fn observed_headers_lower_the_buckets_but_never_raise_them() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let rl = RateLimiter::new(connect().await?, &prefix);
    let limit = RateLimit { output_tokens_per_minute: NonZeroU64::new(6_000), ..small_limit()? };
    let key = "anthropic:claude-opus";

    let low =
        RateHeaders { requests_remaining: Some(2), input_tokens_remaining: Some(500), output_tokens_remaining: None };
    rl.observe_headers(key, &limit, &low, T0).await?;
    assert_eq!(rl.acquire(key, &limit, 1, input(1_000), T0).await?, wait_ms(500));
    let high = RateHeaders {
        requests_remaining: Some(1_000_000),
        input_tokens_remaining: Some(1_000_000),
        output_tokens_remaining: Some(1_000_000),
    };
    rl.observe_headers(key, &limit, &high, T0).await?;
    assert_eq!(rl.acquire(key, &limit, 1, input(1_000), T0).await?, wait_ms(500));

    // Half a second later: 1 000 input tokens and 2.5 requests.
    let t1 = T0 + 500;
    assert_eq!(rl.acquire(key, &limit, 1, input(1_000), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, 1, Tokens::default(), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, 1, Tokens::default(), t1).await?, wait_ms(500));
    // The absent output header left that bucket full (1 000 = 10 s of 6 000 a minute).
    let output = Tokens { input: 0, output: 1_000 };
    assert_eq!(rl.acquire(key, &limit, 0, output, t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, 0, output, t1).await?, wait_ms(10_000));

    cleanup(&prefix).await
}
