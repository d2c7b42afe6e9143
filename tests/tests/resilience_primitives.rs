//! The fleet-wide circuit breaker and token buckets against the real Redis at `REDIS_URL`, with
//! several "workers" on separate connections and a simulated clock. Each test has its own key prefix.

use std::num::{NonZeroU32, NonZeroU64};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use agentfleet::breaker::{BreakerConfig, BreakerStatus, Breakers, Permit, Transition};
use agentfleet::ratelimit::{Acquire, AdaptiveRate, RateHeaders, RateLimit, RateLimiter, Signal, Tokens};
use agentfleet::redis_conn::RedisConn;
use agentfleet_tests::fleet::{delete_keys_under, redis_at, redis_url};
use futures::future::join_all;

/// An arbitrary start of simulated time (Unix ms).
const T0: u64 = 1_700_000_000_000;

/// A connection of its own, as each worker process has (to one server or a cluster).
async fn connect() -> anyhow::Result<RedisConn> {
    redis_at(&redis_url()).await
}

fn fresh_prefix() -> String {
    format!("t{}", ulid::Ulid::new().to_string().to_lowercase())
}

/// Deletes every key under `prefix`.
async fn cleanup(prefix: &str) -> anyhow::Result<()> {
    delete_keys_under(&connect().await?, prefix).await
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

/// A breaker that opens at `rate` of at least `min_calls` outcomes in a 30 s window, cools down for
/// a minute and ramps up in stages of at least 5 s.
fn cfg(rate: f64, min_calls: u32) -> anyhow::Result<BreakerConfig> {
    Ok(BreakerConfig {
        failure_rate: rate,
        min_calls: nz(min_calls)?,
        window: Duration::from_secs(30),
        cool_down: Duration::from_secs(60),
        ramp_interval: Duration::from_secs(5),
    })
}

/// Reports `n` outcomes from worker 0 at `now`; returns the transitions they caused.
async fn outcomes(
    b: &Breakers,
    name: &str,
    cfg: &BreakerConfig,
    n: usize,
    success: bool,
    now: u64,
) -> anyhow::Result<Vec<Transition>> {
    let mut out = Vec::new();
    for _ in 0..n {
        out.extend(b.record(name, cfg, None, success, now).await?);
    }
    Ok(out)
}

/// Opens breaker `name` at `now` with `min_calls` failures.
async fn open_breaker(b: &Breakers, name: &str, cfg: &BreakerConfig, now: u64) -> anyhow::Result<()> {
    let n = cfg.min_calls.get() as usize;
    let transitions = outcomes(b, name, cfg, n, false, now).await?;
    anyhow::ensure!(transitions == [Transition::Opened], "the breaker did not open: {transitions:?}");
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

fn trials(permits: &[Permit]) -> usize {
    permits.iter().filter(|p| p.trial().is_some()).count()
}

#[tokio::test]
async fn the_breaker_opens_on_the_failure_rate_of_enough_calls_across_workers() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 4).await?;
    let cfg = cfg(0.5, 20)?;
    let name = "tool:crm";

    // Twelve failures and no success: above the rate, but fewer than 20 calls. Still closed, and a
    // check on it writes nothing.
    for i in 0..12 {
        assert_eq!(workers[i % 4].record(name, &cfg, None, false, T0 + i as u64).await?, None);
    }
    let ttl_before = pttl(&workers[0].key(name)).await?;
    for b in &workers {
        assert_eq!(b.check(name, &cfg, T0 + 100).await?, Permit::Allow);
    }
    assert!(pttl(&workers[0].key(name)).await? <= ttl_before, "a check on a closed breaker wrote");
    let state = workers[0].state(name, T0 + 100).await?;
    assert_eq!((state.status, state.calls, state.failures), (BreakerStatus::Closed, 12, 12));
    // The key lives for a window, a cool-down, a ramp and a grace minute.
    assert!((150_000..=170_000).contains(&ttl_before), "{ttl_before}");

    // Eight successes: 20 calls, 60 % failed, but a success opens nothing.
    assert!(outcomes(&workers[1], name, &cfg, 8, true, T0 + 200).await?.is_empty());
    // The next failure, from any worker, finds 13 of 21 failed: it opens the breaker.
    assert_eq!(workers[3].record(name, &cfg, None, false, T0 + 300).await?, Some(Transition::Opened));
    let state = workers[2].state(name, T0 + 300).await?;
    assert_eq!((state.status, state.calls, state.failures), (BreakerStatus::Open, 21, 13));
    assert!(!workers[2].check(name, &cfg, T0 + 301).await?.is_allowed());

    // Forty failures at once from four workers against a fresh breaker: exactly one opens it.
    let cfg = &cfg;
    let calls = workers.iter().flat_map(|b| (0..10).map(move |_| b.record("model:anthropic", cfg, None, false, T0)));
    let transitions = join_all(calls).await.into_iter().collect::<Result<Vec<_>, _>>()?;
    assert_eq!(transitions.iter().filter(|t| **t == Some(Transition::Opened)).count(), 1);
    assert_eq!(transitions.iter().filter(|t| t.is_some()).count(), 1);
    let state = workers[0].state("model:anthropic", T0).await?;
    assert_eq!((state.status, state.calls, state.failures), (BreakerStatus::Open, 20, 20));

    cleanup(&prefix).await
}

#[tokio::test]
async fn a_burst_of_failures_among_many_successes_does_not_open_it() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let b = Breakers::new(connect().await?, &prefix);
    let cfg = cfg(0.5, 20)?;
    let name = "model:anthropic";

    // 100 successes, then five failures in a row: the old "5 consecutive" breaker would open.
    assert!(outcomes(&b, name, &cfg, 100, true, T0).await?.is_empty());
    assert!(outcomes(&b, name, &cfg, 5, false, T0 + 1_000).await?.is_empty());
    // A 30 % error rate for a whole window: still closed.
    for i in 0..100_u64 {
        let t = b.record(name, &cfg, None, i % 10 >= 3, T0 + 2_000 + i * 100).await?;
        assert_eq!(t, None, "opened at call {i}");
    }
    let state = b.state(name, T0 + 12_000).await?;
    assert_eq!(state.status, BreakerStatus::Closed, "{state:?}");

    // The window slides: successes older than 30 s no longer count. 60 s later, 10 successes and 10
    // failures in a fresh window open it.
    let t1 = T0 + 60_000;
    assert!(outcomes(&b, name, &cfg, 10, true, t1).await?.is_empty());
    assert_eq!(b.state(name, t1).await?.calls, 10, "the old buckets were dropped");
    assert!(outcomes(&b, name, &cfg, 9, false, t1).await?.is_empty());
    assert_eq!(b.record(name, &cfg, None, false, t1).await?, Some(Transition::Opened));

    cleanup(&prefix).await
}

#[tokio::test]
async fn an_open_breaker_denies_for_the_rest_of_its_cool_down() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 2).await?;
    let cfg = cfg(1.0, 3)?;
    open_breaker(&workers[0], "tool:erp", &cfg, T0).await?;

    let retry_after = Duration::from_secs(50);
    assert_eq!(workers[1].check("tool:erp", &cfg, T0 + 10_000).await?, Permit::Deny { retry_after });
    let state = workers[1].state("tool:erp", T0 + 30_000).await?;
    assert_eq!(state.status, BreakerStatus::Open);
    assert_eq!(state.retry_after, Some(Duration::from_secs(30)));

    // Outcomes of calls that started before it opened change nothing: no longer cool-down.
    assert_eq!(workers[1].record("tool:erp", &cfg, None, false, T0 + 20_000).await?, None);
    assert_eq!(workers[1].record("tool:erp", &cfg, None, true, T0 + 21_000).await?, None);
    let retry_after = Duration::from_millis(1);
    assert_eq!(workers[0].check("tool:erp", &cfg, T0 + 59_999).await?, Permit::Deny { retry_after });
    assert_eq!(workers[0].state("tool:erp", T0 + 59_999).await?.failures, 3);
    let cooled = workers[1].state("tool:erp", T0 + 60_000).await?;
    assert_eq!((cooled.status, cooled.share), (BreakerStatus::HalfOpen, Some(0.1)));

    cleanup(&prefix).await
}

#[tokio::test]
async fn half_open_lets_a_share_through_and_ramps_up_over_good_intervals() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 5).await?;
    let cfg = cfg(0.5, 4)?;
    let name = "model:anthropic";
    open_breaker(&workers[0], name, &cfg, T0).await?;

    // Fifty concurrent checks the moment the cool-down ends: exactly 10 % go through, as trials of
    // one half-open spell; the rest are told to come back when the stage may end.
    let t1 = T0 + 60_000;
    let permits = checks(&workers, name, &cfg, t1, 10).await?;
    assert_eq!(trials(&permits), 5, "{permits:?}");
    let generation = permits.iter().find_map(Permit::trial);
    assert!(permits.iter().filter_map(Permit::trial).all(|g| Some(g) == generation));
    assert!(permits.iter().all(|p| p.is_allowed() || *p == Permit::Deny { retry_after: Duration::from_secs(5) }));

    // Plain calls (begun before it opened) answer nothing; a success before the interval is over
    // does not end the stage.
    assert_eq!(workers[1].record(name, &cfg, None, false, t1 + 100).await?, None);
    assert_eq!(workers[1].record(name, &cfg, generation, true, t1 + 100).await?, None);
    assert_eq!(workers[1].state(name, t1 + 100).await?.share, Some(0.1));

    // After the interval, each stage's first success ramps to the next share: 25 %, 50 %, 100 %.
    let mut t = t1;
    for share in [0.25, 0.5, 1.0] {
        t += 5_000;
        assert_eq!(workers[2].record(name, &cfg, generation, true, t).await?, Some(Transition::Ramped));
        let permits = checks(&workers, name, &cfg, t, 8).await?;
        assert_eq!(trials(&permits), (40.0 * share) as usize, "share {share}: {permits:?}");
        assert_eq!(workers[3].state(name, t).await?.share, Some(share));
    }
    // A good last stage closes it; later checks are allowed without a write.
    t += 5_000;
    assert_eq!(workers[4].record(name, &cfg, generation, true, t).await?, Some(Transition::Closed));
    assert!(checks(&workers, name, &cfg, t + 1, 2).await?.iter().all(|p| *p == Permit::Allow));
    assert_eq!(pttl(&workers[0].key(name)).await?, -2, "a closed breaker without outcomes has no key");

    cleanup(&prefix).await
}

#[tokio::test]
async fn failing_trials_reopen_it_and_stale_trials_count_for_nothing() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let workers = breaker_workers(&prefix, 3).await?;
    let cfg = cfg(0.5, 4)?;
    let name = "tool:mail";
    open_breaker(&workers[0], name, &cfg, T0).await?;

    // Worker 0 takes the first trial and dies without reporting: the next calls of the stage still
    // get their share, so a dead worker cannot wedge the breaker.
    let t1 = T0 + 60_000;
    let first = workers[0].check(name, &cfg, t1).await?;
    let generation = first.trial();
    assert!(generation.is_some(), "{first:?}");
    let permits = checks(&workers[1..], name, &cfg, t1 + 10, 10).await?;
    assert_eq!(trials(&permits), 2, "20 more calls at 10 %: {permits:?}");

    // One success, then failures: 1 of 2 failed is the failure rate, so it reopens.
    assert_eq!(workers[1].record(name, &cfg, generation, true, t1 + 20).await?, None);
    assert_eq!(workers[2].record(name, &cfg, generation, false, t1 + 30).await?, Some(Transition::Reopened));
    let state = workers[2].state(name, t1 + 30).await?;
    assert_eq!((state.status, state.calls, state.failures), (BreakerStatus::Open, 2, 1));
    assert_eq!(state.retry_after, Some(Duration::from_secs(60)));

    // The next half-open spell is a new generation: the first spell's trials count for nothing.
    let t2 = t1 + 30 + 60_000;
    let second = workers[1].check(name, &cfg, t2).await?.trial();
    assert!(second.is_some() && second != generation);
    assert_eq!(workers[0].record(name, &cfg, generation, false, t2 + 1).await?, None);
    assert_eq!(workers[0].state(name, t2 + 1).await?.status, BreakerStatus::HalfOpen);
    // Its own first trial failing reopens it at once.
    assert_eq!(workers[1].record(name, &cfg, second, false, t2 + 2).await?, Some(Transition::Reopened));

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
                    match limiter.acquire("anthropic:claude", &limit, false, 1, Tokens::default(), now).await? {
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

    assert_eq!(rl.acquire(key, &limit, false, 1, input(4_000), T0).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, false, 1, input(4_000), T0).await?, Acquire::Granted);
    // 2 000 tokens left, 2 000 short at 1 000 a second.
    assert_eq!(rl.acquire(key, &limit, false, 1, input(4_000), T0).await?, wait_ms(2_000));
    // The refused call took no request: 8 of 10 remain. Unlimited output tokens are not counted.
    let huge_output = Tokens { input: 0, output: 1_000_000_000 };
    for _ in 0..8 {
        assert_eq!(rl.acquire(key, &limit, false, 1, huge_output, T0).await?, Acquire::Granted);
    }
    assert_eq!(rl.acquire(key, &limit, false, 1, Tokens::default(), T0).await?, wait_ms(1_000));
    assert_eq!(rl.acquire(key, &limit, false, 1, input(4_000), T0 + 2_000).await?, Acquire::Granted);
    // The key lives until the buckets would be full again, plus a minute.
    let ttl = pttl(&rl.key(key)).await?;
    assert!((60_000..=80_000).contains(&ttl), "{ttl}");

    // No limits at all: granted without touching Redis.
    let unlimited = RateLimit::default();
    assert_eq!(rl.acquire("other:model", &unlimited, false, 1_000, input(u64::MAX), T0).await?, Acquire::Granted);
    assert_eq!(pttl(&rl.key("other:model")).await?, -2);

    cleanup(&prefix).await
}

#[tokio::test]
async fn settling_takes_or_gives_back_the_difference() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let rl = RateLimiter::new(connect().await?, &prefix);
    let (limit, key) = (small_limit()?, "anthropic:claude-sonnet");

    // Estimated 8 000, used 3 000: 5 000 come back, 7 000 are left.
    assert_eq!(rl.acquire(key, &limit, false, 1, input(8_000), T0).await?, Acquire::Granted);
    rl.settle(key, &limit, input(8_000), input(3_000), T0).await?;
    assert_eq!(rl.acquire(key, &limit, false, 1, input(7_000), T0).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, false, 1, input(1), T0).await?, wait_ms(1));

    // Estimated 7 000, used 17 000: a debt of 10 000 that the refill repays first.
    rl.settle(key, &limit, input(7_000), input(17_000), T0).await?;
    assert_eq!(rl.acquire(key, &limit, false, 1, input(1_000), T0).await?, wait_ms(11_000));

    // A refund never fills a bucket beyond its capacity.
    let t1 = T0 + 60_000;
    rl.settle(key, &limit, input(5_000), input(0), t1).await?;
    assert_eq!(rl.acquire(key, &limit, false, 1, input(10_000), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, false, 1, input(1), t1).await?, wait_ms(1));

    // A call larger than the bucket goes through once it is full, and leaves a debt behind.
    let t2 = t1 + 60_000;
    assert_eq!(rl.acquire(key, &limit, false, 1, input(25_000), t2).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, false, 1, input(1), t2).await?, wait_ms(15_001));

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
    assert_eq!(rl.acquire(key, &limit, false, 1, input(1_000), T0).await?, wait_ms(500));
    let high = RateHeaders {
        requests_remaining: Some(1_000_000),
        input_tokens_remaining: Some(1_000_000),
        output_tokens_remaining: Some(1_000_000),
    };
    rl.observe_headers(key, &limit, &high, T0).await?;
    assert_eq!(rl.acquire(key, &limit, false, 1, input(1_000), T0).await?, wait_ms(500));

    // Half a second later: 1 000 input tokens and 2.5 requests.
    let t1 = T0 + 500;
    assert_eq!(rl.acquire(key, &limit, false, 1, input(1_000), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, false, 1, Tokens::default(), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, false, 1, Tokens::default(), t1).await?, wait_ms(500));
    // The absent output header left that bucket full (1 000 = 10 s of 6 000 a minute).
    let output = Tokens { input: 0, output: 1_000 };
    assert_eq!(rl.acquire(key, &limit, false, 0, output, t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &limit, false, 0, output, t1).await?, wait_ms(10_000));

    cleanup(&prefix).await
}

/// `rl.adapt` with `signal`, `n` times at `now`; the last rate it returned.
async fn adapt_n(
    rl: &RateLimiter,
    key: &str,
    limit: &RateLimit,
    signal: Signal,
    n: usize,
    now: u64,
) -> anyhow::Result<Option<f64>> {
    let mut last = None;
    for _ in 0..n {
        last = rl.adapt(key, limit, &AdaptiveRate::default(), signal, now).await?;
    }
    Ok(last)
}

fn close_to(got: Option<f64>, want: f64) -> bool {
    got.is_some_and(|g| (g - want).abs() < 0.01)
}

#[tokio::test]
async fn overloads_shrink_the_rate_to_its_floor_and_successes_grow_it_back() -> anyhow::Result<()> {
    let prefix = fresh_prefix();
    let rl = RateLimiter::new(connect().await?, &prefix);
    let (key, unlimited) = ("anthropic:claude-sonnet", RateLimit::default());

    // No limit configured: the limiter only counts grants, 50 a second for 20 s (3 000 a minute).
    // A success while the provider is not overloaded changes nothing.
    for i in 0..1_000 {
        assert_eq!(rl.acquire(key, &unlimited, true, 1, Tokens::default(), T0 + i * 20).await?, Acquire::Granted);
    }
    let now = T0 + 20_000;
    assert_eq!(adapt_n(&rl, key, &unlimited, Signal::Success, 1, now).await?, None);

    // The first 529 starts the adaptive rate at what the fleet was sending, times 0.9.
    let rate = adapt_n(&rl, key, &unlimited, Signal::Overload, 1, now).await?;
    assert!(close_to(rate, 2_700.0), "{rate:?}");
    // Its bucket holds 2 s worth (90 requests) and refills at 45 a second.
    for _ in 0..90 {
        assert_eq!(rl.acquire(key, &unlimited, true, 1, Tokens::default(), now).await?, Acquire::Granted);
    }
    assert_eq!(rl.acquire(key, &unlimited, true, 1, Tokens::default(), now).await?, wait_ms(23));

    // Each overload multiplies it by 0.9, down to the floor of 60 a minute, where a step still gets
    // a request every second: the fleet slows down, it never stops.
    let rate = adapt_n(&rl, key, &unlimited, Signal::Overload, 10, now).await?;
    assert!(close_to(rate, 2_700.0 * 0.9_f64.powi(10)), "{rate:?}");
    let rate = adapt_n(&rl, key, &unlimited, Signal::Overload, 100, now).await?;
    assert!(close_to(rate, 60.0), "{rate:?}");
    let t1 = now + 60_000;
    assert_eq!(rl.acquire(key, &unlimited, true, 1, Tokens::default(), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &unlimited, true, 1, Tokens::default(), t1).await?, Acquire::Granted);
    assert_eq!(rl.acquire(key, &unlimited, true, 1, Tokens::default(), t1).await?, wait_ms(1_000));

    // The 90 grants at `now` counted too: 590 in this window and the one before, which span 10 s,
    // is 3 540 a minute, and the overloads after them raised the starting rate to it. Each success
    // adds 5 % of it (177 a minute); back at 3 540 the bucket is gone.
    let rate = adapt_n(&rl, key, &unlimited, Signal::Success, 19, t1).await?;
    assert!(close_to(rate, 60.0 + 19.0 * 177.0), "{rate:?}");
    assert_eq!(adapt_n(&rl, key, &unlimited, Signal::Success, 1, t1).await?, None);
    for _ in 0..500 {
        assert_eq!(rl.acquire(key, &unlimited, true, 1, Tokens::default(), t1).await?, Acquire::Granted);
    }

    // A count that just began is not diluted by the windows before it: 30 grants in half a second
    // read as 30 in the shortest span counted, one second (1 800 a minute).
    let fresh = "anthropic:claude-haiku";
    for i in 0..30 {
        assert_eq!(rl.acquire(fresh, &unlimited, true, 1, Tokens::default(), t1 + i * 16).await?, Acquire::Granted);
    }
    let rate = adapt_n(&rl, fresh, &unlimited, Signal::Overload, 1, t1 + 500).await?;
    assert!(close_to(rate, 1_800.0 * 0.9), "{rate:?}");

    // Grants a worker let through on its own count with its overload, and those another worker
    // counts later raise the starting rate at the next overload: a busy fleet's first 529 must not
    // hold it at the fraction of its rate that Redis had seen.
    let busy = "anthropic:claude-busy";
    for i in 0..10 {
        assert_eq!(rl.acquire(busy, &unlimited, true, 1, Tokens::default(), t1 + i).await?, Acquire::Granted);
    }
    let adaptive = AdaptiveRate::default();
    let rate = rl.adapt_counting(busy, &unlimited, &adaptive, Signal::Overload, 50, t1 + 10).await?;
    assert!(close_to(rate, 3_600.0 * 0.9), "60 grants in the first second: {rate:?}");
    let late = rl.acquire_counting(busy, &unlimited, true, 40, Tokens::default(), t1 + 20).await?;
    assert_eq!(late, (Acquire::Granted, true));
    let rate = rl.adapt_counting(busy, &unlimited, &adaptive, Signal::Overload, 0, t1 + 30).await?;
    assert!(close_to(rate, 3_600.0 * 0.81), "the rate shrinks from where it was: {rate:?}");
    let rate = rl.adapt(busy, &unlimited, &adaptive, Signal::Success, t1 + 40).await?;
    assert!(close_to(rate, 3_600.0 * 0.81 + 303.0), "5 % of 101 grants a second: {rate:?}");

    // With requests_per_minute configured, the rate starts from it; the configured bucket stays.
    let limit = RateLimit { requests_per_minute: Some(nz(600)?), ..Default::default() };
    let rate = adapt_n(&rl, "anthropic:claude-opus", &limit, Signal::Overload, 1, t1).await?;
    assert!(close_to(rate, 540.0), "{rate:?}");
    // The adaptive bucket (18 requests) is now the tighter one.
    for _ in 0..18 {
        assert_eq!(
            rl.acquire("anthropic:claude-opus", &limit, true, 1, Tokens::default(), t1).await?,
            Acquire::Granted
        );
    }
    let blocked = rl.acquire("anthropic:claude-opus", &limit, true, 1, Tokens::default(), t1).await?;
    assert!(matches!(blocked, Acquire::Wait { .. }), "{blocked:?}");
    let ttl = pttl(&rl.key("anthropic:claude-opus")).await?;
    assert!(ttl > 0, "every rate key has a TTL: {ttl}");

    cleanup(&prefix).await
}
