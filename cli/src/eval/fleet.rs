//! The eval's own fleet: a dispatcher and workers started from the agent config under test.
//!
//! The config file is copied with what an eval must own changed: its RabbitMQ and Redis names (a
//! prefix of its own, so a production fleet on the same broker is never touched; in Redis one per
//! run, so no breaker, rate or daily-cap state of an earlier run weighs on this one, and finished
//! sessions kept an hour), loopback ports,
//! one admin token of the eval's, no metrics listener, and the model API pointed at the eval's
//! proxy. Everything else — agents, tools, approval rules, budgets — is the file's. The processes
//! are the real `agentfleet-dispatcher` and `agentfleet-worker`, found beside this binary or in
//! `--bin-dir`; their logs go to the run's folder.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sha2::{Digest, Sha256};
use tokio::process::{Child, Command};

/// How long the dispatcher may take to answer `/readyz`.
const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// How long the eval's finished sessions stay in Redis: long enough to look into a failed case.
const RETENTION_MS: i64 = 3_600_000;

/// How long a process may take to drain after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);

/// What to start.
pub(crate) struct FleetSpec<'a> {
    pub(crate) config: &'a Path,
    pub(crate) bin_dir: &'a Path,
    pub(crate) workers: usize,
    pub(crate) prefix: &'a str,
    /// The base URL the fleet sends Anthropic calls to.
    pub(crate) model_url: &'a str,
    pub(crate) run_dir: &'a Path,
}

/// The API key the fleet sends when none is set: the scripted model server takes any key.
const PLACEHOLDER_KEY: &str = "scripted-local";

/// A running fleet.
pub(crate) struct Fleet {
    children: Vec<(String, Child)>,
    /// The dispatcher's API.
    pub(crate) url: String,
    /// The admin token of the eval.
    pub(crate) token: String,
    run_dir: PathBuf,
    /// The config file the eval's is a copy of.
    source: PathBuf,
}

/// The model API the config (or `ANTHROPIC_BASE_URL`) points at: the proxy's upstream.
pub(crate) fn upstream_model_url(config: &Path) -> anyhow::Result<String> {
    if let Some(url) = std::env::var("ANTHROPIC_BASE_URL").ok().filter(|u| !u.is_empty()) {
        return Ok(url);
    }
    let table = read_config(config)?;
    let url = table.get("anthropic").and_then(|a| a.get("base_url")).and_then(toml::Value::as_str);
    Ok(url.unwrap_or("https://api.anthropic.com").to_owned())
}

fn read_config(config: &Path) -> anyhow::Result<toml::Table> {
    let text =
        std::fs::read_to_string(config).with_context(|| format!("--config {}: cannot read it", config.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("--config {}: {}", config.display(), e.message()))
}

impl Fleet {
    /// Writes the eval's config, starts the processes and waits for the dispatcher to be ready.
    pub(crate) async fn start(spec: &FleetSpec<'_>) -> anyhow::Result<Self> {
        let token = format!("aft_eval_{}", ulid::Ulid::new().to_string().to_lowercase());
        let api_port = free_port()?;
        let ops_port = free_port()?;
        let config = eval_config(read_config(spec.config)?, spec, &token, api_port, ops_port)?;
        let config_path = spec.run_dir.join("agentfleet.toml");
        std::fs::write(&config_path, config).with_context(|| format!("cannot write {}", config_path.display()))?;
        let mut fleet = Self {
            children: Vec::new(),
            url: format!("http://127.0.0.1:{api_port}"),
            token,
            run_dir: spec.run_dir.to_owned(),
            source: spec.config.to_owned(),
        };
        fleet.spawn(spec, "dispatcher", "agentfleet-dispatcher", &config_path)?;
        for i in 1..=spec.workers {
            fleet.spawn(spec, &format!("worker-{i}"), "agentfleet-worker", &config_path)?;
        }
        fleet.wait_ready(&format!("http://127.0.0.1:{ops_port}/readyz")).await?;
        Ok(fleet)
    }

    fn spawn(&mut self, spec: &FleetSpec<'_>, name: &str, binary: &str, config: &Path) -> anyhow::Result<()> {
        let path = spec.bin_dir.join(binary);
        if !path.is_file() {
            bail!(
                "{} not found: build it (`cargo build --bins`) or pass --bin-dir with the folder of the fleet's binaries",
                path.display()
            );
        }
        let log = std::fs::File::create(self.run_dir.join(format!("{name}.log")))?;
        let mut command = Command::new(&path);
        if std::env::var("ANTHROPIC_API_KEY").is_ok_and(|k| !k.is_empty()) {
            // Passed on as it is.
        } else {
            command.env("ANTHROPIC_API_KEY", PLACEHOLDER_KEY);
        }
        let child = command
            .arg("--config")
            .arg(config)
            .env("ANTHROPIC_BASE_URL", spec.model_url)
            .env_remove("AGENTFLEET_POOLS")
            .env_remove("AGENTFLEET_METRICS_LISTEN")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", path.display()))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    async fn wait_ready(&mut self, readyz: &str) -> anyhow::Result<()> {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(2)).build()?;
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            self.check_alive()?;
            if http.get(readyz).send().await.is_ok_and(|a| a.status().is_success()) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("the eval's dispatcher was not ready within {READY_TIMEOUT:?}: {}", self.log_tail("dispatcher"));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// An error naming the first process that has exited, with the end of its log.
    pub(crate) fn check_alive(&mut self) -> anyhow::Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let name = name.clone();
                bail!(
                    "the eval's {name} (its config is a copy of {} with the eval's names, ports and token) \
                     exited ({status}):\n{}",
                    self.source.display(),
                    self.log_tail(&name)
                );
            }
        }
        Ok(())
    }

    fn log_tail(&self, name: &str) -> String {
        let path = self.run_dir.join(format!("{name}.log"));
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = lines[lines.len().saturating_sub(8)..].join("\n");
        format!("{tail}\n(the whole log: {})", path.display())
    }

    /// SIGTERM to every process (workers drain), then SIGKILL past [`STOP_TIMEOUT`].
    pub(crate) async fn stop(mut self) {
        for (_, child) in &self.children {
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
        }
        for (_, child) in &mut self.children {
            if tokio::time::timeout(STOP_TIMEOUT, child.wait()).await.is_err() {
                let _ = child.kill().await;
            }
        }
    }
}

/// The config of the eval's fleet: `table` with what the eval owns replaced.
fn eval_config(
    mut table: toml::Table,
    spec: &FleetSpec<'_>,
    token: &str,
    api_port: u16,
    ops_port: u16,
) -> anyhow::Result<String> {
    fn section<'t>(table: &'t mut toml::Table, name: &str) -> anyhow::Result<&'t mut toml::Table> {
        let entry = table.entry(name).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        entry.as_table_mut().with_context(|| format!("--config: `{name}` must be a table"))
    }
    let s = |v: &str| toml::Value::String(v.to_owned());
    section(&mut table, "amqp")?.insert("prefix".into(), s(spec.prefix));
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let key_prefix = format!("{}-{}", spec.prefix, &run[run.len() - 8..]);
    section(&mut table, "redis")?.insert("key_prefix".into(), s(&key_prefix));
    section(&mut table, "sessions")?.insert("retention_ms".into(), toml::Value::Integer(RETENTION_MS));
    section(&mut table, "anthropic")?.insert("base_url".into(), s(spec.model_url));
    let dispatcher = section(&mut table, "dispatcher")?;
    dispatcher.insert("listen".into(), s(&format!("127.0.0.1:{api_port}")));
    dispatcher.insert("ops_listen".into(), s(&format!("127.0.0.1:{ops_port}")));
    section(&mut table, "worker")?.insert("metrics_listen".into(), s(""));
    let hash: String = Sha256::digest(token.as_bytes()).iter().map(|b| format!("{b:02x}")).collect();
    let mut admin = toml::Table::new();
    admin.insert("name".into(), s("eval"));
    admin.insert("tenant".into(), s("eval"));
    admin.insert("roles".into(), toml::Value::Array(vec![s("admin")]));
    admin.insert("sha256".into(), s(&hash));
    section(&mut table, "auth")?.insert("tokens".into(), toml::Value::Array(vec![toml::Value::Table(admin)]));
    Ok(toml::to_string(&table)?)
}

/// A loopback port free right now.
fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// The folder of the fleet's binaries: `--bin-dir`, else this binary's.
pub(crate) fn bin_dir(given: Option<&Path>) -> anyhow::Result<PathBuf> {
    if let Some(dir) = given {
        return Ok(dir.to_owned());
    }
    let exe = std::env::current_exe().context("cannot tell where this binary is; pass --bin-dir")?;
    Ok(exe.parent().context("this binary has no folder; pass --bin-dir")?.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_eval_owns_names_ports_tokens_and_the_model_url() -> anyhow::Result<()> {
        let table: toml::Table = toml::from_str(
            r#"
            [amqp]
            url = "amqp://x"
            [[auth.tokens]]
            name = "prod"
            sha256 = "00"
            [agents.support]
            model = "m"
            system_prompt = "p"
            "#,
        )?;
        let spec = FleetSpec {
            config: Path::new("c.toml"),
            bin_dir: Path::new("."),
            workers: 1,
            prefix: "agentfleet-eval",
            model_url: "http://127.0.0.1:9",
            run_dir: Path::new("."),
        };
        let out: toml::Table = toml::from_str(&eval_config(table, &spec, "tok", 1, 2)?)?;
        assert_eq!(out["amqp"]["url"].as_str(), Some("amqp://x"));
        assert_eq!(out["amqp"]["prefix"].as_str(), Some("agentfleet-eval"));
        let key_prefix = out["redis"]["key_prefix"].as_str().unwrap_or_default();
        assert!(key_prefix.starts_with("agentfleet-eval-") && key_prefix.len() == 24, "{key_prefix}");
        assert_eq!(out["anthropic"]["base_url"].as_str(), Some("http://127.0.0.1:9"));
        assert_eq!(out["dispatcher"]["listen"].as_str(), Some("127.0.0.1:1"));
        let tokens = out["auth"]["tokens"].as_array().expect("tokens");
        assert_eq!(tokens.len(), 1);
        assert_eq!(tokens[0]["name"].as_str(), Some("eval"));
        assert_eq!(out["agents"]["support"]["system_prompt"].as_str(), Some("p"));
        Ok(())
    }
}
