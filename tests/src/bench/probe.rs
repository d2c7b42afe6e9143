//! Counters of the services a run shares with whatever else is on the machine: Redis
//! (`INFO commandstats`, `total_net_input_bytes`), RabbitMQ (its global message counters) and the
//! scripted model server (`GET /admin/stats`).
//!
//! A run takes a [`Snapshot`] when nothing of it is moving yet and another once it has drained, and
//! divides the [`Delta`] by the steps in between: exact totals, with no timing skew, and nothing
//! runs beside the measured processes while they are measured (`rabbitmqctl` starts an Erlang VM,
//! a second of CPU).

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

/// Commands of the bench itself, left out of the fleet's Redis calls: the snapshots' own `INFO`
/// and `CONFIG`, and the `ZCARD` of the live-session poller (counted by the poller, see
/// [`Delta::redis_calls_without`]).
const OWN_COMMANDS: [&str; 2] = ["info", "config"];

/// The counters at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Snapshot {
    /// Calls by Redis command (`evalsha`, `hget`, …), top-level and from scripts alike: Redis
    /// counts a script's `redis.call`s under their own commands (round trips are counted apart,
    /// by [`super::census`]).
    pub redis_calls: BTreeMap<String, u64>,
    /// Bytes Redis has read from its clients: every command with its arguments.
    pub redis_net_input_bytes: u64,
    /// Redis clients connected now (the bench's own included).
    pub redis_clients: u64,
    /// RabbitMQ's global counters summed over protocols and queue types (`messages_received_total`
    /// = published, `messages_delivered_total`, `messages_acknowledged_total`, …); empty when
    /// `rabbitmqctl` could not be run.
    pub rabbitmq: BTreeMap<String, i64>,
    /// The model server's `requests_total`, `answered_total`, `request_bytes_total` and any
    /// counter whose name speaks of connections or protocols, when it reports them.
    pub model: BTreeMap<String, u64>,
}

impl Snapshot {
    /// Reads every counter. `reset_redis` first zeroes Redis's (`CONFIG RESETSTAT`), so that
    /// `INFO commandstats` holds only what follows.
    pub async fn take(redis_url: &str, model_url: &str, reset_redis: bool) -> anyhow::Result<Self> {
        let mut redis = redis::Client::open(redis_url)?.get_multiplexed_async_connection().await?;
        if reset_redis {
            let () = redis::cmd("CONFIG").arg("RESETSTAT").query_async(&mut redis).await?;
        }
        let commandstats: String = redis::cmd("INFO").arg("commandstats").query_async(&mut redis).await?;
        let stats: String = redis::cmd("INFO").arg("stats").query_async(&mut redis).await?;
        let clients: String = redis::cmd("INFO").arg("clients").query_async(&mut redis).await?;
        Ok(Self {
            redis_calls: command_calls(&commandstats),
            redis_net_input_bytes: info_field(&stats, "total_net_input_bytes").unwrap_or(0),
            redis_clients: info_field(&clients, "connected_clients").unwrap_or(0),
            rabbitmq: rabbitmq_counters().await.unwrap_or_default(),
            model: model_counters(model_url).await?,
        })
    }

    /// What happened between `self` and the later `after`.
    pub fn until(&self, after: &Snapshot) -> Delta {
        let redis_calls = after
            .redis_calls
            .iter()
            .map(|(cmd, n)| (cmd.clone(), n.saturating_sub(self.redis_calls.get(cmd).copied().unwrap_or(0))))
            .filter(|(cmd, n)| *n > 0 && !OWN_COMMANDS.contains(&cmd.as_str()))
            .collect();
        // Only the counters: `publishers` and `consumers` are gauges.
        let rabbitmq = after
            .rabbitmq
            .iter()
            .filter(|(k, _)| k.ends_with("_total"))
            .filter_map(|(k, v)| self.rabbitmq.get(k).map(|before| (k.clone(), v - before)))
            .collect();
        let model = after
            .model
            .iter()
            .map(|(k, v)| (k.clone(), v.saturating_sub(self.model.get(k).copied().unwrap_or(0))))
            .collect();
        Delta {
            redis_calls,
            redis_net_input_bytes: after.redis_net_input_bytes.saturating_sub(self.redis_net_input_bytes),
            rabbitmq,
            model,
        }
    }
}

/// The counters' growth between two snapshots.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Delta {
    /// Redis calls by command, without the snapshots' own.
    pub redis_calls: BTreeMap<String, u64>,
    /// Bytes Redis read from its clients.
    pub redis_net_input_bytes: u64,
    /// RabbitMQ's global counters (empty when unreadable).
    pub rabbitmq: BTreeMap<String, i64>,
    /// The model server's counters.
    pub model: BTreeMap<String, u64>,
}

impl Delta {
    /// Redis calls without `own` (the bench's own commands, e.g. `("zcard", n)` of its poller).
    pub fn redis_calls_without(&self, own: &[(&str, u64)]) -> BTreeMap<String, u64> {
        let mut calls = self.redis_calls.clone();
        for (cmd, n) in own {
            if let Some(c) = calls.get_mut(*cmd) {
                *c = c.saturating_sub(*n);
            }
        }
        calls.retain(|_, n| *n > 0);
        calls
    }

    /// A model server counter's growth (0 when it does not report it).
    pub fn model(&self, key: &str) -> u64 {
        self.model.get(key).copied().unwrap_or(0)
    }

    /// A RabbitMQ counter's growth, when RabbitMQ could be read.
    pub fn rabbitmq(&self, key: &str) -> Option<i64> {
        self.rabbitmq.get(key).copied()
    }
}

/// `calls` by command from `INFO commandstats` (`cmdstat_evalsha:calls=12,usec=…`).
fn command_calls(info: &str) -> BTreeMap<String, u64> {
    info.lines()
        .filter_map(|l| l.strip_prefix("cmdstat_"))
        .filter_map(|l| {
            let (cmd, fields) = l.split_once(':')?;
            let calls = fields.split(',').find_map(|f| f.strip_prefix("calls="))?.parse().ok()?;
            Some((cmd.to_owned(), calls))
        })
        .collect()
}

/// A numeric `name:value` field of an `INFO` section.
fn info_field(info: &str, name: &str) -> Option<u64> {
    info.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(':')?.trim().parse().ok())
}

/// The Erlang expression that sums RabbitMQ's global counters over protocols and queue types.
const RABBITMQ_COUNTERS: &str = "lists:foldl(fun({_, M}, Acc) -> maps:fold(fun(K, V, A) -> \
     maps:update_with(K, fun(X) -> X + V end, V, A) end, Acc, M) end, #{}, \
     maps:to_list(rabbit_global_counters:overview())).";

/// How long `rabbitmqctl eval` may take.
const RABBITMQCTL_TIMEOUT: Duration = Duration::from_secs(30);

/// RabbitMQ's global message counters, through `rabbitmqctl eval` (the management API is a plugin
/// that may be off; these counters are always kept). `None` when `rabbitmqctl` is missing, fails
/// or is too slow.
pub async fn rabbitmq_counters() -> Option<BTreeMap<String, i64>> {
    let run = tokio::process::Command::new("rabbitmqctl").args(["eval", RABBITMQ_COUNTERS]).kill_on_drop(true).output();
    let out = tokio::time::timeout(RABBITMQCTL_TIMEOUT, run).await.ok()?.ok()?;
    if !out.status.success() {
        tracing::warn!(stderr = %String::from_utf8_lossy(&out.stderr), "rabbitmqctl eval failed");
        return None;
    }
    let counters = erlang_map(&String::from_utf8_lossy(&out.stdout));
    (!counters.is_empty()).then_some(counters)
}

/// `key => integer` pairs of a printed Erlang map (`#{consumers => 0,messages_received_total => 5}`).
fn erlang_map(text: &str) -> BTreeMap<String, i64> {
    text.split([',', '{', '}', '\n'])
        .filter_map(|pair| {
            let (k, v) = pair.split_once("=>")?;
            Some((k.trim().trim_start_matches('#').to_owned(), v.trim().parse().ok()?))
        })
        .collect()
}

/// The model server's request counters; every other counter it reports is about connections.
pub const REQUEST_COUNTERS: [&str; 3] = ["requests_total", "answered_total", "request_bytes_total"];

/// The counters of the model server's `GET /admin/stats` ([`Snapshot::model`]).
pub async fn model_counters(model_url: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let url = format!("{model_url}/admin/stats");
    let stats: serde_json::Value = reqwest::get(&url)
        .await
        .and_then(reqwest::Response::error_for_status)
        .with_context(|| format!("GET {url}"))?
        .json()
        .await?;
    Ok(counters_of(&stats))
}

/// The request counters and every numeric field about connections or HTTP versions (another
/// version of the server may report them; their names are not fixed here, so they are matched).
fn counters_of(stats: &serde_json::Value) -> BTreeMap<String, u64> {
    let Some(fields) = stats.as_object() else { return BTreeMap::new() };
    let wanted = |k: &str| REQUEST_COUNTERS.contains(&k) || ["conn", "http2", "h2"].iter().any(|w| k.contains(w));
    let mut counters = BTreeMap::new();
    for (k, v) in fields.iter().filter(|(k, _)| wanted(k)) {
        flatten_numbers(k, v, &mut counters);
    }
    counters
}

/// Every non-negative integer in `v`, named by its path (`connections.http2`).
fn flatten_numbers(path: &str, v: &serde_json::Value, out: &mut BTreeMap<String, u64>) {
    match v {
        serde_json::Value::Number(n) => {
            if let Some(n) = n.as_u64() {
                out.insert(path.to_owned(), n);
            }
        }
        serde_json::Value::Object(fields) => {
            for (k, v) in fields {
                flatten_numbers(&format!("{path}.{k}"), v, out);
            }
        }
        _ => {}
    }
}

/// Sets the model server's faults (`POST /admin/faults`), e.g. `{"latency_ms": 2000}`; missing
/// fields take their defaults, so `{}` clears them.
pub async fn set_model_faults(model_url: &str, faults: &serde_json::Value) -> anyhow::Result<()> {
    let url = format!("{model_url}/admin/faults");
    reqwest::Client::new()
        .post(&url)
        .json(faults)
        .send()
        .await?
        .error_for_status()
        .with_context(|| format!("POST {url}"))?;
    Ok(())
}

/// The versions of Redis (`INFO server`) and RabbitMQ (`rabbitmqctl version`), `unknown` when
/// unreadable.
pub async fn service_versions(redis_url: &str) -> (String, String) {
    let redis = async {
        let mut conn = redis::Client::open(redis_url).ok()?.get_multiplexed_async_connection().await.ok()?;
        let info: String = redis::cmd("INFO").arg("server").query_async(&mut conn).await.ok()?;
        info.lines().find_map(|l| l.strip_prefix("redis_version:")).map(|v| v.trim().to_owned())
    };
    let rabbit = Command::new("rabbitmqctl")
        .arg("version")
        .output()
        .ok()
        .filter(|o| o.status.success())
        .and_then(|o| String::from_utf8_lossy(&o.stdout).lines().last().map(|l| l.trim().to_owned()));
    (redis.await.unwrap_or_else(|| "unknown".into()), rabbit.unwrap_or_else(|| "unknown".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_commandstats_and_info_fields() {
        let info =
            "# Commandstats\r\ncmdstat_evalsha:calls=12,usec=40,usec_per_call=3.3\r\ncmdstat_hget:calls=3,usec=1\r\n";
        assert_eq!(command_calls(info), BTreeMap::from([("evalsha".into(), 12), ("hget".into(), 3)]));
        assert_eq!(info_field("# Stats\r\ntotal_net_input_bytes:1234\r\n", "total_net_input_bytes"), Some(1234));
    }

    #[test]
    fn reads_a_printed_erlang_map() {
        let text =
            "#{consumers => 0,messages_confirmed_total => 10,\n  messages_delivered_total => 7,publishers => -2}\n";
        let map = erlang_map(text);
        assert_eq!(map["messages_confirmed_total"], 10);
        assert_eq!(map["messages_delivered_total"], 7);
        assert_eq!(map["publishers"], -2);
        assert_eq!(map["consumers"], 0);
    }

    #[test]
    fn keeps_request_and_connection_counters_whatever_their_names() {
        let stats = serde_json::json!({
            "requests_total": 5, "answered_total": 4, "request_bytes_total": 9000,
            "max_tokens_seen": [1, 2], "connections": {"accepted": 3, "http2": 2}, "status_counts": {"200": 4}
        });
        let c = counters_of(&stats);
        assert_eq!(c.len(), 5, "{c:?}");
        assert_eq!(c["connections.accepted"], 3);
        assert_eq!(c["connections.http2"], 2);
    }

    #[test]
    fn a_delta_leaves_out_the_bench_own_calls() {
        let before = Snapshot { redis_calls: BTreeMap::from([("evalsha".into(), 10)]), ..Default::default() };
        let after = Snapshot {
            redis_calls: BTreeMap::from([("evalsha".into(), 50), ("info".into(), 3), ("zcard".into(), 7)]),
            ..Default::default()
        };
        let delta = before.until(&after);
        assert_eq!(delta.redis_calls_without(&[("zcard", 7)]), BTreeMap::from([("evalsha".into(), 40)]));
    }
}
