//! The command line: global options and one subcommand per thing people do with sessions.
//!
//! Values the API would reject anyway are still checked here when clap can say it better (a status
//! that does not exist, metadata that is not a JSON object, a page size out of range).

use clap::{Parser, Subcommand};

/// The statuses a session can be in, as the API names them.
pub(crate) const STATUSES: [&str; 9] = [
    "queued",
    "running",
    "awaiting_human",
    "awaiting_approval",
    "paused",
    "completed",
    "failed",
    "budget_exhausted",
    "cancelled",
];

/// Runs agents on an agentfleet and answers what they ask people.
#[derive(Debug, Parser)]
#[command(name = "agentfleet", version, propagate_version = true)]
pub(crate) struct Args {
    /// The dispatcher's base URL.
    #[arg(long, global = true, env = "AGENTFLEET_URL", default_value = "http://127.0.0.1:8080")]
    pub(crate) url: String,
    /// The API token, sent as `Authorization: Bearer <token>`.
    #[arg(long, global = true, env = "AGENTFLEET_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<Token>,
    /// Print the API's JSON (one document) instead of text.
    #[arg(long, global = true)]
    pub(crate) json: bool,
    #[command(subcommand)]
    pub(crate) command: Command,
}

/// An API token; its `Debug` never shows it.
#[derive(Clone)]
pub(crate) struct Token(pub(crate) String);

impl std::str::FromStr for Token {
    type Err = &'static str;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.trim().is_empty() { Err("the token is empty") } else { Ok(Self(s.trim().to_owned())) }
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// What to do.
#[derive(Debug, Subcommand)]
pub(crate) enum Command {
    /// Start a session; prints its id (with --wait, follows it to the end).
    Submit(Submit),
    /// Show a session: status, step, usage, result or error, and what it waits for.
    Status {
        /// The session id (`s_…`).
        id: String,
    },
    /// List sessions, newest first.
    List(List),
    /// Follow a session and its conversation until it ends or waits for people.
    Watch {
        /// The session id.
        id: String,
    },
    /// Start a new session from a step of another: its conversation as that step began, the last
    /// user message replaced if asked, a fresh budget; prints the new id (with --wait, follows it).
    Fork(Fork),
    /// Cancel a session (at once when it waits, else at its next step boundary).
    Cancel {
        /// The session id.
        id: String,
    },
    /// List the sessions that wait for people: escalations and approvals.
    Escalations,
    /// Show a session's trace as a timeline: every model call, tool call, error and decision.
    Trace {
        /// The session id.
        id: String,
    },
    /// Answer a session that escalated to a human.
    Reply {
        /// The session id.
        id: String,
        /// The answer; read from stdin when absent or `-`.
        text: Option<String>,
    },
    /// Check a process's operations endpoint (`/healthz`, `/readyz`): exit 0 when it answers 2xx,
    /// 1 otherwise. For container healthchecks: the image has no shell or curl.
    Probe {
        /// The endpoint, e.g. `http://127.0.0.1:9090/readyz`.
        url: String,
        /// How long to wait for the answer, in ms.
        #[arg(long, default_value_t = 2000)]
        timeout_ms: u64,
    },
    /// Approve the tool call a session waits on.
    Approve {
        /// The session id.
        id: String,
        /// A note for the log.
        #[arg(long)]
        note: Option<String>,
    },
    /// Reject the tool call a session waits on; the model is told why.
    Reject {
        /// The session id.
        id: String,
        /// Why, as the model will read it.
        #[arg(long)]
        reason: String,
    },
    /// Run a suite of cases through a fleet and judge each against its expectations (exit 1 when
    /// one fails). With --config the eval starts its own fleet from that agent config.
    Eval(Eval),
    /// Read, re-drive or discard the dead letters: messages the fleet could not process.
    #[command(subcommand)]
    Dlq(crate::dlq::Dlq),
}

/// `agentfleet submit`.
#[derive(Debug, clap::Args)]
pub(crate) struct Submit {
    /// The agent to run.
    #[arg(long)]
    pub(crate) agent: String,
    /// The tenant the session belongs to.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// Makes a retried submission return the first session instead of starting another.
    #[arg(long)]
    pub(crate) idempotency_key: Option<String>,
    /// Metadata kept with the session: a JSON object.
    #[arg(long, value_name = "JSON", value_parser = parse_object)]
    pub(crate) metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// Lower the agent's step limit for this session.
    #[arg(long)]
    pub(crate) max_steps: Option<u32>,
    /// Lower the agent's cost limit for this session, in US dollars.
    #[arg(long)]
    pub(crate) max_cost_usd: Option<f64>,
    /// Lower the agent's token limit for this session.
    #[arg(long)]
    pub(crate) max_tokens: Option<u64>,
    /// Follow the session until it ends or waits for people; the exit code says how it stopped.
    #[arg(long)]
    pub(crate) wait: bool,
    /// The goal; read from stdin when absent or `-`.
    pub(crate) goal: Option<String>,
}

/// `agentfleet fork`.
#[derive(Debug, clap::Args)]
pub(crate) struct Fork {
    /// The session to fork.
    pub(crate) id: String,
    /// The step to run again, from 1 (as `agentfleet trace` numbers them).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) from_step: u32,
    /// A new text for the last user message before that step (its tool results are kept).
    #[arg(long)]
    pub(crate) message: Option<String>,
    /// Run the fork with another agent.
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// Lower the agent's step limit for the fork.
    #[arg(long)]
    pub(crate) max_steps: Option<u32>,
    /// Lower the agent's cost limit for the fork, in US dollars.
    #[arg(long)]
    pub(crate) max_cost_usd: Option<f64>,
    /// Follow the fork until it ends or waits for people; the exit code says how it stopped.
    #[arg(long)]
    pub(crate) wait: bool,
}

/// `agentfleet list`.
#[derive(Debug, clap::Args)]
pub(crate) struct List {
    /// Only sessions in this status.
    #[arg(long, value_parser = clap::builder::PossibleValuesParser::new(STATUSES))]
    pub(crate) status: Option<String>,
    /// Only sessions of this agent.
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// Only sessions of this tenant.
    #[arg(long)]
    pub(crate) tenant: Option<String>,
    /// Sessions per page (the API's default is 50).
    #[arg(long, value_parser = clap::value_parser!(u16).range(1..=500))]
    pub(crate) limit: Option<u16>,
    /// Follow `next_cursor` through every page.
    #[arg(long)]
    pub(crate) all: bool,
}

/// Parses `--metadata`: it must be a JSON object.
fn parse_object(text: &str) -> Result<serde_json::Map<String, serde_json::Value>, String> {
    match serde_json::from_str(text) {
        Ok(serde_json::Value::Object(map)) => Ok(map),
        Ok(_) => Err("must be a JSON object, e.g. '{\"ticket\": \"T-1\"}'".to_owned()),
        Err(e) => Err(format!("not JSON: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<Args, clap::Error> {
        Args::try_parse_from(std::iter::once("agentfleet").chain(args.iter().copied()))
    }

    #[test]
    fn the_command_line_is_consistent() {
        use clap::CommandFactory;
        Args::command().debug_assert();
    }

    #[test]
    fn submit_takes_a_goal_and_global_options_anywhere() -> Result<(), clap::Error> {
        let args = parse(&["submit", "--agent", "support", "hello", "--json", "--url", "http://x:1"])?;
        assert!(args.json);
        assert_eq!(args.url, "http://x:1");
        let Command::Submit(s) = args.command else { panic!("not submit: {:?}", args.command) };
        assert_eq!((s.agent.as_str(), s.goal.as_deref(), s.wait), ("support", Some("hello"), false));
        Ok(())
    }

    #[test]
    fn metadata_must_be_an_object() {
        assert!(parse(&["submit", "--agent", "a", "--metadata", r#"{"k": 1}"#, "g"]).is_ok());
        assert!(parse(&["submit", "--agent", "a", "--metadata", "[1]", "g"]).is_err());
        assert!(parse(&["submit", "--agent", "a", "--metadata", "{", "g"]).is_err());
    }

    #[test]
    fn list_checks_status_and_limit() {
        assert!(parse(&["list", "--status", "awaiting_human", "--limit", "500"]).is_ok());
        assert!(parse(&["list", "--status", "sleeping"]).is_err());
        assert!(parse(&["list", "--limit", "0"]).is_err());
        assert!(parse(&["list", "--limit", "501"]).is_err());
    }

    #[test]
    fn the_token_is_global_and_never_printed() -> Result<(), clap::Error> {
        let args = parse(&["list", "--token", "sekrit"])?;
        assert_eq!(args.token.as_ref().map(|t| t.0.as_str()), Some("sekrit"));
        assert!(!format!("{args:?}").contains("sekrit"));
        assert!(parse(&["--token", "", "list"]).is_err());
        Ok(())
    }

    #[test]
    fn dlq_redrive_takes_an_id_or_all_with_filters() {
        assert!(parse(&["dlq", "redrive", "d_1"]).is_ok());
        assert!(parse(&["dlq", "redrive", "--all", "--reason", "delivery_limit", "--limit", "10"]).is_ok());
        assert!(parse(&["dlq", "redrive"]).is_err(), "an id or --all");
        assert!(parse(&["dlq", "redrive", "d_1", "--all"]).is_err(), "not both");
        assert!(parse(&["dlq", "list", "--kind", "step", "--oldest", "--json"]).is_ok());
        assert!(parse(&["dlq", "list", "--kind", "nope"]).is_err());
        assert!(parse(&["dlq", "discard", "d_1"]).is_ok());
    }

    #[test]
    fn reject_needs_a_reason() {
        assert!(parse(&["reject", "s_1"]).is_err());
        assert!(parse(&["reject", "s_1", "--reason", "too much"]).is_ok());
    }
}

/// `eval`'s options.
#[derive(Debug, clap::Args)]
pub(crate) struct Eval {
    /// The suite file (TOML: `[[cases]]` with `input` and `expect`; see docs/EVALS.md).
    pub(crate) suite: std::path::PathBuf,
    /// The agent config to evaluate. The eval starts its own fleet from it (the real dispatcher and
    /// workers, under their own RabbitMQ and Redis names); without it, the cases run on the fleet
    /// at --url.
    #[arg(long)]
    pub(crate) config: Option<std::path::PathBuf>,
    /// The agent the cases run on (overrides the suite's `agent`).
    #[arg(long)]
    pub(crate) agent: Option<String>,
    /// Store the model's answers for each case in this folder.
    #[arg(long, conflicts_with = "replay")]
    pub(crate) record: Option<std::path::PathBuf>,
    /// Answer the model calls from a folder written by --record: no model cost, and a request that
    /// differs from the recorded one is reported as a mismatch.
    #[arg(long)]
    pub(crate) replay: Option<std::path::PathBuf>,
    /// A report written by --out of an earlier run: name the cases that regressed or improved.
    #[arg(long)]
    pub(crate) baseline: Option<std::path::PathBuf>,
    /// Write the report as JSON to this file (what --baseline reads).
    #[arg(long)]
    pub(crate) out: Option<std::path::PathBuf>,
    /// Write JUnit XML to this file.
    #[arg(long)]
    pub(crate) junit: Option<std::path::PathBuf>,
    /// Cases in flight at once.
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..=1000))]
    pub(crate) concurrency: u16,
    /// Worker processes of the eval's own fleet.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=64))]
    pub(crate) workers: u16,
    /// The RabbitMQ and Redis name prefix of the eval's own fleet.
    #[arg(long, default_value = "agentfleet-eval")]
    pub(crate) prefix: String,
    /// The folder of `agentfleet-dispatcher` and `agentfleet-worker` (default: this binary's).
    #[arg(long)]
    pub(crate) bin_dir: Option<std::path::PathBuf>,
    /// Only the cases whose id contains this, or that have it as a tag.
    #[arg(long)]
    pub(crate) filter: Option<String>,
}
