//! Redis durability at start (issue 12, DESIGN §10): real worker processes against private
//! `redis-server`s. Without AOF, or with an evicting `maxmemory-policy`, the worker warns and
//! starts; with `redis.require_durable = true` it refuses to start and says why; against AOF and
//! `noeviction` it says Redis is durable and warns of nothing. A Redis that refuses `CONFIG`
//! cannot be verified: a warning, or a refusal with `require_durable`. The dispatcher runs the
//! same check in `Dispatcher::build`.
//!
//! The workers get an AMQP URL where no broker listens: the check runs before the broker is
//! dialled, and the shared RabbitMQ never sees these workers.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use agentfleet::config::Config;
use agentfleet_dispatcher::Dispatcher;
use agentfleet_tests::chaos::services::PrivateRedis;
use agentfleet_tests::fleet::{FleetOptions, config_text, eventually};
use anyhow::Context;

/// Where no broker listens (port 1 is never given out to tests).
const NO_BROKER: &str = "amqp://guest:guest@127.0.0.1:1/%2f";

fn scratch_dir(what: &str) -> anyhow::Result<PathBuf> {
    let name = format!("{what}-{}", ulid::Ulid::new().to_string().to_lowercase());
    let dir = std::env::temp_dir().join("agentfleet-tests").join("durability").join(name);
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// The harness's config against `redis`, with `require_durable` as given.
fn config(redis: &PrivateRedis, require_durable: bool) -> String {
    let opts = FleetOptions { redis_url: redis.url(), ..Default::default() };
    let text = config_text("durability", &opts, "http://127.0.0.1:1", "http://127.0.0.1:1");
    text.replacen("[redis]\n", &format!("[redis]\nrequire_durable = {require_durable}\n"), 1)
}

/// A worker process whose output (JSON log lines and the last error) goes to one file.
struct WorkerProcess {
    child: Child,
    log: PathBuf,
    dir: PathBuf,
}

impl WorkerProcess {
    fn start(redis: &PrivateRedis, require_durable: bool) -> anyhow::Result<Self> {
        let dir = scratch_dir("worker")?;
        let config_path = dir.join("agentfleet.toml");
        std::fs::write(&config_path, config(redis, require_durable))?;
        let log = dir.join("worker.log");
        let out = std::fs::File::create(&log)?;
        let child = Command::new(env!("CARGO_BIN_EXE_agentfleet-test-worker"))
            .arg("--config")
            .arg(&config_path)
            .env("AMQP_URL", NO_BROKER)
            .env("REDIS_URL", redis.url())
            .env("ANTHROPIC_API_KEY", "test-key")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning agentfleet-test-worker")?;
        Ok(Self { child, log, dir })
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the output contains `needle`, and returns the output.
    async fn wait_for(&self, needle: &str) -> String {
        let what = format!("the worker to log {needle:?}");
        eventually(&what, Duration::from_secs(20), || async {
            let text = self.output();
            text.contains(needle).then_some(text)
        })
        .await
    }

    /// Waits for the process to exit by itself; returns its exit code and output.
    async fn wait_exit(&mut self) -> (Option<i32>, String) {
        let child = &mut self.child;
        let status = eventually("the worker to exit", Duration::from_secs(20), || {
            let status = child.try_wait().ok().flatten();
            async move { status }
        })
        .await;
        (status.code(), self.output())
    }

    fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

const NOT_DURABLE: &str = "REDIS IS NOT DURABLE";

#[tokio::test]
async fn a_redis_without_aof_is_warned_about_and_the_worker_starts() -> anyhow::Result<()> {
    let redis = PrivateRedis::start_with(&scratch_dir("redis")?, &["--appendonly", "no"]).await?;
    let mut worker = WorkerProcess::start(&redis, false)?;
    let out = worker.wait_for(NOT_DURABLE).await;
    assert!(out.contains("AOF is off (appendonly = no)"), "{out}");
    assert!(out.contains("restart loses every session"), "the warning says why: {out}");
    assert!(out.contains("appendonly yes"), "the warning says how to fix it: {out}");
    assert!(!out.contains("maxmemory-policy is"), "noeviction is fine: {out}");
    assert!(worker.is_running(), "the worker stopped: {out}");
    Ok(())
}

#[tokio::test]
async fn an_evicting_redis_is_warned_about() -> anyhow::Result<()> {
    let redis =
        PrivateRedis::start_with(&scratch_dir("redis")?, &["--appendonly", "yes", "--maxmemory-policy", "allkeys-lru"])
            .await?;
    let mut worker = WorkerProcess::start(&redis, false)?;
    let out = worker.wait_for(NOT_DURABLE).await;
    assert!(out.contains("maxmemory-policy is allkeys-lru"), "{out}");
    assert!(out.contains("drops session keys and leases"), "the warning says why: {out}");
    assert!(!out.contains("AOF is off"), "AOF is on: {out}");
    assert!(worker.is_running(), "the worker stopped: {out}");
    Ok(())
}

#[tokio::test]
async fn require_durable_refuses_to_start_and_names_the_problems() -> anyhow::Result<()> {
    let redis =
        PrivateRedis::start_with(&scratch_dir("redis")?, &["--appendonly", "no", "--maxmemory-policy", "volatile-lru"])
            .await?;
    let mut worker = WorkerProcess::start(&redis, true)?;
    let (code, out) = worker.wait_exit().await;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}: {out}");
    assert!(out.contains("redis.require_durable is set and Redis is not durable"), "{out}");
    assert!(out.contains("appendonly = no") && out.contains("maxmemory-policy is volatile-lru"), "{out}");
    Ok(())
}

#[tokio::test]
async fn a_durable_redis_passes_without_a_warning() -> anyhow::Result<()> {
    let redis =
        PrivateRedis::start_with(&scratch_dir("redis")?, &["--appendonly", "yes", "--appendfsync", "everysec"]).await?;
    // With `require_durable`: a durable Redis must neither be warned about nor refused.
    let mut worker = WorkerProcess::start(&redis, true)?;
    let out = worker.wait_for("Redis is durable").await;
    assert!(out.contains("everysec"), "{out}");
    assert!(!out.contains(NOT_DURABLE) && !out.contains("COULD NOT BE VERIFIED"), "{out}");
    assert!(worker.is_running(), "the worker stopped: {out}");
    Ok(())
}

#[tokio::test]
async fn a_redis_that_refuses_config_cannot_be_verified() -> anyhow::Result<()> {
    let redis =
        PrivateRedis::start_with(&scratch_dir("redis")?, &["--appendonly", "yes", "--rename-command", "CONFIG", ""])
            .await?;
    let mut warned = WorkerProcess::start(&redis, false)?;
    let out = warned.wait_for("REDIS DURABILITY COULD NOT BE VERIFIED").await;
    assert!(out.contains("CONFIG GET appendonly"), "the warning says what was refused: {out}");
    assert!(warned.is_running(), "the worker stopped: {out}");

    let mut refused = WorkerProcess::start(&redis, true)?;
    let (code, out) = refused.wait_exit().await;
    assert!(code.is_some_and(|c| c != 0), "exit code {code:?}: {out}");
    assert!(out.contains("Redis durability cannot be verified"), "{out}");
    Ok(())
}

#[tokio::test]
async fn the_dispatcher_refuses_a_redis_without_aof_when_durability_is_required() -> anyhow::Result<()> {
    let redis = PrivateRedis::start_with(&scratch_dir("redis")?, &["--appendonly", "no"]).await?;
    let dir = scratch_dir("dispatcher")?;
    let path = dir.join("agentfleet.toml");
    std::fs::write(&path, config(&redis, true))?;
    let env = |k: &str| (k == "AMQP_URL").then(|| NO_BROKER.to_owned());
    let cfg = Config::load(&path, &env)?;
    let _ = std::fs::remove_dir_all(&dir);
    let e = match Dispatcher::build(cfg, None, None).await {
        Ok(_) => anyhow::bail!("the dispatcher started on a Redis without AOF"),
        Err(e) => format!("{e:#}"),
    };
    assert!(e.contains("require_durable") && e.contains("appendonly = no"), "{e}");
    Ok(())
}
