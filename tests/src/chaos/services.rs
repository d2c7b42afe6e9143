//! A private Redis and a private RabbitMQ node for the chaos suite, so that its kills and restarts
//! never touch the services the rest of the machine shares.
//!
//! Each runs as a child process in its own process group, from a directory of its own, on ports
//! picked free at start. Redis runs with AOF on (`appendfsync everysec`) and `noeviction`, the
//! settings production needs. Dropping a service kills its process group; [`PrivateRabbit::stop`]
//! and [`PrivateRedis::stop`] end them politely.

use std::os::unix::process::CommandExt as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

/// How long a service may take to start (RabbitMQ boots in about 5 s on an idle machine, and
/// recovers its quorum queues after a restart).
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// The ports RabbitMQ's command-line tools use for their own Erlang distribution (25672 + 10000
/// and the next ten): a broker listening there would collide with any `rabbitmqctl` run.
const CLI_DIST_PORTS: std::ops::RangeInclusive<u16> = 35672..=35682;

/// A TCP port on 127.0.0.1 that nothing listens on now.
pub fn free_port() -> anyhow::Result<u16> {
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        if !CLI_DIST_PORTS.contains(&port) {
            return Ok(port);
        }
    }
}

/// SIGKILLs the process group led by `child` and reaps `child`.
fn kill_group(child: &mut Child) {
    let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
    let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
    let _ = child.kill();
    let _ = child.wait();
}

/// Waits up to `timeout` for `child` to exit by itself.
async fn wait_exit(child: &mut Child, timeout: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while child.try_wait()?.is_none() {
        ensure!(Instant::now() < deadline, "process {} did not exit within {timeout:?}", child.id());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

/// A `redis-server` of a test's or the suite's own, on a free port; killed on drop.
pub struct PrivateRedis {
    port: u16,
    dir: PathBuf,
    /// Settings after the defaults (a later one wins).
    settings: Vec<String>,
    child: Option<Child>,
}

impl PrivateRedis {
    /// Starts `redis-server` with AOF on (`everysec`, `noeviction`), its files in `dir`.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        Self::start_with(dir, &[]).await
    }

    /// Starts it with `settings` (`--name value` pairs) over those defaults.
    pub async fn start_with(dir: &Path, settings: &[&str]) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let settings = settings.iter().map(|s| (*s).to_owned()).collect();
        let mut redis = Self { port: free_port()?, dir: dir.to_owned(), settings, child: None };
        redis.spawn().await?;
        Ok(redis)
    }

    /// Starts it again, on the same port and directory, after [`stop`](Self::stop).
    pub async fn start_again(&mut self) -> anyhow::Result<()> {
        self.spawn().await
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("redis.out"))?;
        let child = Command::new("redis-server")
            .args(["--bind", "127.0.0.1", "--port", &self.port.to_string()])
            .args(["--appendonly", "yes", "--appendfsync", "everysec", "--maxmemory-policy", "noeviction"])
            .args(["--save", "", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.settings)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .context("starting redis-server (is it installed? `bash scripts/services.sh` installs it)")?;
        self.child = Some(child);
        self.wait_pong(START_TIMEOUT).await
    }

    /// Waits until it answers PING (not `LOADING`: the AOF has been replayed).
    async fn wait_pong(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let url = self.url();
        loop {
            let ping = async {
                let client = redis::Client::open(url.as_str())?;
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await
            };
            if tokio::time::timeout(Duration::from_secs(2), ping).await.is_ok_and(|r| r.is_ok()) {
                return Ok(());
            }
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("redis-server exited with {status}; see {}", self.dir.join("redis.out").display());
            }
            ensure!(Instant::now() < deadline, "the private Redis did not answer within {timeout:?}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// `kill -9`, then a start on the same port and directory after `down`: what it had written to
    /// the AOF comes back (at most the last second is lost, by `appendfsync everysec`).
    pub async fn kill_and_restart(&mut self, down: Duration) -> anyhow::Result<()> {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
        tokio::time::sleep(down).await;
        self.spawn().await
    }

    /// Stops it (SIGTERM, then SIGKILL after 10 s).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = nix::unistd::Pid::from_raw(child.id() as i32);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
            if wait_exit(&mut child, Duration::from_secs(10)).await.is_err() {
                kill_group(&mut child);
            }
        }
    }
}

impl Drop for PrivateRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}

/// A RabbitMQ node of the suite's own, with its own node name, ports, cookie, data and logs.
pub struct PrivateRabbit {
    node: String,
    port: u16,
    dir: PathBuf,
    cookie: String,
    server: PathBuf,
    ctl: PathBuf,
    child: Option<Child>,
}

/// The path of a RabbitMQ program: the unwrapped one Debian keeps in `/usr/lib/rabbitmq/bin`
/// (the `/usr/sbin` wrappers switch to the `rabbitmq` user), else the one on `PATH`.
fn rabbitmq_program(name: &str) -> anyhow::Result<PathBuf> {
    let unwrapped = Path::new("/usr/lib/rabbitmq/bin").join(name);
    if unwrapped.exists() {
        return Ok(unwrapped);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let dirs = std::env::split_paths(&path).chain([PathBuf::from("/usr/sbin"), PathBuf::from("/usr/local/sbin")]);
    dirs.map(|d| d.join(name))
        .find(|p| p.exists())
        .with_context(|| format!("{name} is missing: install RabbitMQ (`bash scripts/services.sh` does)"))
}

impl PrivateRabbit {
    /// Starts a node whose files live in `dir`, and waits until it has booted.
    pub async fn start(dir: &Path) -> anyhow::Result<Self> {
        for sub in ["mnesia", "log", "home"] {
            std::fs::create_dir_all(dir.join(sub))?;
        }
        let port = free_port()?;
        let dist_port = free_port()?;
        let cookie: String = (0..32).map(|_| char::from(b'A' + rand::random_range(0..26u8))).collect();
        let cookie_file = dir.join("home/.erlang.cookie");
        std::fs::write(&cookie_file, &cookie)?;
        std::fs::set_permissions(
            &cookie_file,
            <std::fs::Permissions as std::os::unix::fs::PermissionsExt>::from_mode(0o400),
        )?;
        // A short heartbeat, so a paused client is noticed in about 20 s rather than minutes.
        let conf = format!("listeners.tcp.1 = 127.0.0.1:{port}\nheartbeat = 10\nloopback_users = none\n");
        std::fs::write(dir.join("rabbitmq.conf"), conf)?;
        std::fs::write(dir.join("enabled_plugins"), "[].\n")?;
        std::fs::write(dir.join("rabbitmq-env.conf"), "")?;
        std::fs::write(dir.join("dist_port"), dist_port.to_string())?;
        let mut rabbit = Self {
            node: format!("chaos-{}@localhost", std::process::id()),
            port,
            dir: dir.to_owned(),
            cookie,
            server: rabbitmq_program("rabbitmq-server")?,
            ctl: rabbitmq_program("rabbitmqctl")?,
            child: None,
        };
        rabbit.spawn().await?;
        Ok(rabbit)
    }

    /// Its AMQP URL.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// Its node name.
    pub fn node(&self) -> &str {
        &self.node
    }

    fn dist_port(&self) -> anyhow::Result<String> {
        Ok(std::fs::read_to_string(self.dir.join("dist_port"))?)
    }

    async fn spawn(&mut self) -> anyhow::Result<()> {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.dir.join("log/server.out"))?;
        let d = &self.dir;
        let child = Command::new(&self.server)
            .env("HOME", d.join("home"))
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_DIST_PORT", self.dist_port()?)
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_ADVANCED_CONFIG_FILE", d.join("advanced.config"))
            .env("RABBITMQ_CONF_ENV_FILE", d.join("rabbitmq-env.conf"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .env("ERL_EPMD_ADDRESS", "127.0.0.1")
            .env_remove("RABBITMQ_NODE_PORT")
            .env_remove("ERL_FLAGS")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0)
            .spawn()
            .with_context(|| format!("starting {}", self.server.display()))?;
        self.child = Some(child);
        self.wait_booted().await
    }

    /// Runs `rabbitmqctl -n <node> ARGS` with this node's cookie.
    async fn ctl(&self, args: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let mut cmd = tokio::process::Command::new(&self.ctl);
        cmd.args(["-q", "-n", &self.node, "--erlang-cookie", &self.cookie]).args(args).kill_on_drop(true);
        let out = tokio::time::timeout(timeout, cmd.output())
            .await
            .with_context(|| format!("rabbitmqctl {args:?} took more than {timeout:?}"))??;
        ensure!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(())
    }

    /// Waits until the node runs (it registers with epmd), then until the broker has booted.
    async fn wait_booted(&mut self) -> anyhow::Result<()> {
        let deadline = Instant::now() + START_TIMEOUT;
        while self.ctl(&["ping"], Duration::from_secs(15)).await.is_err() {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("rabbitmq-server exited with {status}; see {}", self.dir.join("log").display());
            }
            ensure!(Instant::now() < deadline, "the private RabbitMQ node did not start within {START_TIMEOUT:?}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.ctl(&["--timeout", "110", "await_startup"], START_TIMEOUT).await
    }

    /// Stops the node (`rabbitmqctl stop`), waits `down`, and starts it again from the same data.
    pub async fn restart(&mut self, down: Duration) -> anyhow::Result<()> {
        self.stop().await?;
        tokio::time::sleep(down).await;
        self.spawn().await
    }

    /// Stops the node politely; kills it when that fails.
    pub async fn stop(&mut self) -> anyhow::Result<()> {
        let Some(mut child) = self.child.take() else { return Ok(()) };
        let stopped = self.ctl(&["stop"], Duration::from_secs(60)).await;
        if stopped.is_err() || wait_exit(&mut child, Duration::from_secs(30)).await.is_err() {
            kill_group(&mut child);
        }
        // The node's helpers (`erl_child_setup`, `inet_gethost`) share its process group.
        let pgid = nix::unistd::Pid::from_raw(child.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        stopped
    }
}

impl Drop for PrivateRabbit {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_group(&mut child);
        }
    }
}
