//! Redis round trips per step, counted one by one: `INFO commandstats` counts a script's own
//! `redis.call`s under their commands, so it cannot tell a round trip from a call inside one.
//! `MONITOR` can: it shows every command with its client, and `lua` as the client of a script's.
//!
//! `MONITOR` slows Redis down, so it runs apart from the timed windows, over a few sessions of its
//! own; only lines that name the fleet's key prefix are counted (other clients of the same Redis
//! are not the fleet's).

use std::collections::BTreeMap;

use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

/// Commands seen by `MONITOR`, by command.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Commands {
    /// Top-level commands: the round trips.
    pub round_trips: BTreeMap<String, u64>,
    /// Commands that scripts ran.
    pub in_scripts: BTreeMap<String, u64>,
}

impl Commands {
    /// Counts one `MONITOR` line when it names `prefix`.
    fn count(&mut self, line: &str, prefix: &str) {
        if !line.contains(prefix) {
            return;
        }
        let Some((client, command)) = parse(line) else { return };
        let counts = if client == "lua" { &mut self.in_scripts } else { &mut self.round_trips };
        *counts.entry(command).or_default() += 1;
    }

    /// All round trips.
    pub fn total_round_trips(&self) -> u64 {
        self.round_trips.values().sum()
    }
}

/// The client and the lower-cased command of a `MONITOR` line:
/// `1339518083.107412 [0 127.0.0.1:60866] "EVALSHA" "…"` or `… [0 lua] "HGET" …`.
fn parse(line: &str) -> Option<(String, String)> {
    let (_, rest) = line.split_once('[')?;
    let (client, rest) = rest.split_once(']')?;
    let client = client.split_whitespace().nth(1)?.to_owned();
    let command = rest.trim_start().strip_prefix('"')?.split('"').next()?.to_lowercase();
    Some((client, command))
}

/// A `MONITOR` connection counting the commands that name `prefix` until [`Census::stop`].
pub struct Census {
    task: JoinHandle<Commands>,
    stop: tokio_util::sync::CancellationToken,
}

impl Census {
    /// Starts watching the Redis at `redis_url`.
    pub async fn start(redis_url: &str, prefix: &str) -> anyhow::Result<Self> {
        let monitor = redis::Client::open(redis_url)?.get_async_monitor().await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let (token, prefix) = (stop.clone(), prefix.to_owned());
        let task = tokio::spawn(async move {
            let mut lines = monitor.into_on_message::<String>();
            let mut seen = Commands::default();
            loop {
                tokio::select! {
                    () = token.cancelled() => break,
                    line = lines.next() => match line {
                        Some(line) => seen.count(&line, &prefix),
                        None => break,
                    },
                }
            }
            seen
        });
        Ok(Self { task, stop })
    }

    /// Stops watching and returns what was seen.
    pub async fn stop(self) -> anyhow::Result<Commands> {
        // Let the last lines arrive.
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        self.stop.cancel();
        Ok(self.task.await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tells_round_trips_from_script_calls() {
        let mut seen = Commands::default();
        seen.count(r#"1339518083.107412 [0 127.0.0.1:60866] "EVALSHA" "abc" "1" "t01:{s}:meta""#, "t01");
        seen.count(r#"1339518083.107413 [0 lua] "HGET" "t01:{s}:meta" "step""#, "t01");
        seen.count(r#"1339518083.107414 [0 127.0.0.1:60866] "GET" "other:key""#, "t01");
        seen.count(r#"1339518083.107415 [0 unix:/tmp/redis.sock] "ZCARD" "t01:active""#, "t01");
        assert_eq!(seen.round_trips, BTreeMap::from([("evalsha".into(), 1), ("zcard".into(), 1)]));
        assert_eq!(seen.in_scripts, BTreeMap::from([("hget".into(), 1)]));
        assert_eq!(seen.total_round_trips(), 2);
    }
}
