//! `agentfleet`: the command-line client of the dispatcher's HTTP API.
//!
//! It is a pure HTTP client — it does not link the fleet's own crates — so it stays small and proves
//! that the public API is enough to run the fleet: submit goals, follow sessions, list them, and answer
//! the escalations and approvals that wait for people, and read and re-drive the dead letters.
//!
//! Output is text for people by default; `--json` prints the API's JSON, one document, for scripts.
//! Exit codes: 0 when the command (or the followed session) succeeded, 2 when a followed session
//! waits for people (`awaiting_human`, `awaiting_approval`), 64 for a command-line mistake, and 1 for
//! anything else — an API error, an unreachable dispatcher, or a session that did not complete.

mod api;
mod args;
mod commands;
mod dlq;
mod eval;
mod follow;
mod format;
mod model;
mod output;
mod view;

use std::process::ExitCode;

use clap::Parser;

use crate::args::Args;

/// How a command ended, as the process's exit code says it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Exit {
    /// Done, or the session completed.
    Success,
    /// The session waits for people.
    Waiting,
    /// The session ended, or paused, without completing.
    NotCompleted,
}

impl Exit {
    /// The exit for a session that stopped moving in `status`.
    pub(crate) fn of_status(status: &str) -> Self {
        match status {
            "completed" => Self::Success,
            "awaiting_human" | "awaiting_approval" => Self::Waiting,
            _ => Self::NotCompleted,
        }
    }
}

impl From<Exit> for ExitCode {
    fn from(e: Exit) -> Self {
        match e {
            Exit::Success => ExitCode::SUCCESS,
            Exit::Waiting => ExitCode::from(2),
            Exit::NotCompleted => ExitCode::FAILURE,
        }
    }
}

/// The exit code of a command-line mistake (`EX_USAGE`), distinct from "waits for people" (2).
const USAGE_ERROR: u8 = 64;

/// Parses the command line, runs the command, and prints any error; never panics.
pub fn main() -> ExitCode {
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) => return usage(&e),
    };
    let outcome = runtime().and_then(|rt| rt.block_on(commands::run(args)));
    match outcome {
        Ok(exit) => exit.into(),
        Err(e) if is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Prints clap's message; `--help` and `--version` are not mistakes.
fn usage(e: &clap::Error) -> ExitCode {
    let _ = e.print();
    if e.use_stderr() { ExitCode::from(USAGE_ERROR) } else { ExitCode::SUCCESS }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// True when stdout was closed early (`agentfleet list | head`): nothing to report.
fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().filter_map(|c| c.downcast_ref::<std::io::Error>()).any(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_exit_codes() {
        assert_eq!(Exit::of_status("completed"), Exit::Success);
        assert_eq!(Exit::of_status("awaiting_human"), Exit::Waiting);
        assert_eq!(Exit::of_status("awaiting_approval"), Exit::Waiting);
        for s in ["failed", "budget_exhausted", "cancelled", "paused", "unknown"] {
            assert_eq!(Exit::of_status(s), Exit::NotCompleted, "{s}");
        }
    }
}
