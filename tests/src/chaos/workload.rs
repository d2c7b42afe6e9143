//! The chaos suite's sessions: a seeded mix of kinds, each with the end state it must reach.
//!
//! Goals use the scripted model's directives (see `model_server::script`), and each carries a
//! unique `chaos-<i>` tag, so the model server's bills by goal are bills by session.

use rand::rngs::StdRng;
use rand::{Rng as _, SeedableRng as _};
use serde_json::{Value, json};

/// The HTTP tool that fails on purpose, served by the suite's own tool server.
pub const FLAKY_TOOL: &str = "flaky_lookup";

/// The agent that calls [`FLAKY_TOOL`].
pub const FLAKY_AGENT: &str = "flaky";

/// The steps a capped session may take (its script wants more).
pub const CAPPED_MAX_STEPS: u32 = 4;

/// The tools of the harness's `support` agent.
pub const SUPPORT_TOOLS: [&str; 4] = ["search_knowledge_base", "lookup_customer", "escalate_to_human", "issue_refund"];

/// What a session does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// `[steps=1..2]`: completes.
    Short,
    /// `[steps=8..12]`: completes.
    Long,
    /// The support flow asking for a human: waits for a human, who replies; then completes.
    Escalating,
    /// `[refund=250]`: waits for approval, is approved, the refund runs once; then completes.
    Approval,
    /// `[steps=3..5]` on a tool with outages and errors: completes, with error results.
    FailingTool,
    /// `[steps=12]` with `max_steps = 4`: ends `budget_exhausted` after 4 steps.
    Capped,
}

impl Kind {
    /// Every kind, in report order.
    pub const ALL: [Kind; 6] =
        [Kind::Short, Kind::Long, Kind::Escalating, Kind::Approval, Kind::FailingTool, Kind::Capped];

    /// Its name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Short => "short",
            Kind::Long => "long",
            Kind::Escalating => "escalating",
            Kind::Approval => "approval",
            Kind::FailingTool => "failing-tool",
            Kind::Capped => "capped",
        }
    }

    /// The status it must end in.
    pub fn expected_status(self) -> &'static str {
        match self {
            Kind::Capped => "budget_exhausted",
            _ => "completed",
        }
    }
}

/// Out of every 20 sessions: 6 short, 5 long, 2 escalating, 2 approval, 3 failing-tool, 2 capped.
const MIX: [Kind; 20] = [
    Kind::Short,
    Kind::Long,
    Kind::FailingTool,
    Kind::Short,
    Kind::Escalating,
    Kind::Long,
    Kind::Short,
    Kind::Approval,
    Kind::Capped,
    Kind::Long,
    Kind::Short,
    Kind::FailingTool,
    Kind::Escalating,
    Kind::Long,
    Kind::Short,
    Kind::Approval,
    Kind::FailingTool,
    Kind::Short,
    Kind::Capped,
    Kind::Long,
];

/// One session of the workload.
#[derive(Debug, Clone)]
pub struct Planned {
    /// Its index.
    pub index: usize,
    /// What it does.
    pub kind: Kind,
    /// Its goal (the first user message), unique in the run.
    pub goal: String,
    /// Its agent.
    pub agent: &'static str,
    /// The `POST /v1/sessions` body.
    pub body: Value,
    /// For `[steps=N]` scripts that complete: N.
    pub steps: Option<usize>,
    /// The steps it may take.
    pub max_steps: u32,
    /// The tools its agent offers.
    pub tools: &'static [&'static str],
}

impl Planned {
    /// The text a human replies to an escalating session.
    pub fn human_reply(&self) -> String {
        format!("A human handled chaos-{} by hand.", self.index)
    }
}

/// `n` sessions, shuffled by `seed`; `agent_max_steps` is the agents' `max_steps`.
pub fn plan(n: usize, seed: u64, agent_max_steps: u32) -> Vec<Planned> {
    let mut rng = StdRng::seed_from_u64(seed);
    let offset = rng.random_range(0..MIX.len());
    (0..n)
        .map(|index| {
            let kind = MIX[(index + offset) % MIX.len()];
            let tag = format!("chaos-{index}");
            let (agent, goal, steps, tools): (_, _, _, &'static [&'static str]) = match kind {
                Kind::Short => {
                    let n = rng.random_range(1..=2);
                    ("support", format!("[steps={n}] {tag}"), Some(n), &SUPPORT_TOOLS)
                }
                Kind::Long => {
                    let n = rng.random_range(8..=12);
                    ("support", format!("[steps={n}] {tag}"), Some(n), &SUPPORT_TOOLS)
                }
                Kind::Escalating => {
                    let goal = format!("Please let a human handle my order {tag}, {tag}@example.com");
                    ("support", goal, None, &SUPPORT_TOOLS)
                }
                Kind::Approval => ("support", format!("[refund=250] {tag}"), None, &SUPPORT_TOOLS),
                Kind::FailingTool => {
                    let n = rng.random_range(3..=5);
                    (FLAKY_AGENT, format!("[steps={n} tool={FLAKY_TOOL}] {tag}"), Some(n), &[FLAKY_TOOL])
                }
                Kind::Capped => ("support", format!("[steps=12] {tag}"), None, &SUPPORT_TOOLS),
            };
            let mut body = json!({ "agent": agent, "input": goal, "idempotency_key": format!("chaos-{seed}-{index}") });
            let max_steps = if kind == Kind::Capped {
                body["budget"] = json!({ "max_steps": CAPPED_MAX_STEPS });
                CAPPED_MAX_STEPS
            } else {
                agent_max_steps
            };
            Planned { index, kind, goal, agent, body, steps, max_steps, tools }
        })
        .collect()
}

/// The `[tools.flaky_lookup]` and `[agents.flaky]` tables, the tool served at `tools_url`.
pub fn flaky_config(tools_url: &str, max_steps: u32) -> String {
    format!(
        r#"
[tools.{FLAKY_TOOL}]
description = "Looks things up in a backend that has outages."
input_schema = {{ type = "object", properties = {{ query = {{ type = "string" }} }}, required = ["query"] }}
handler = {{ kind = "http", url = "{tools_url}/tools/{FLAKY_TOOL}", timeout_ms = 3000 }}

[agents.{FLAKY_AGENT}]
model = "claude-sonnet-4-5"
system_prompt = "You look things up."
tools = ["{FLAKY_TOOL}"]
budget = {{ max_steps = {max_steps} }}
"#
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_mix_is_seeded_and_has_every_kind() {
        let a = plan(40, 7, 50);
        let b = plan(40, 7, 50);
        assert_eq!(
            a.iter().map(|p| p.goal.clone()).collect::<Vec<_>>(),
            b.iter().map(|p| p.goal.clone()).collect::<Vec<_>>()
        );
        for kind in Kind::ALL {
            assert!(a.iter().any(|p| p.kind == kind), "{kind:?} missing");
        }
        let goals: std::collections::BTreeSet<&str> = a.iter().map(|p| p.goal.as_str()).collect();
        assert_eq!(goals.len(), 40, "goals are unique");
        let capped = a.iter().find(|p| p.kind == Kind::Capped).expect("capped");
        assert_eq!(capped.body["budget"]["max_steps"], CAPPED_MAX_STEPS);
    }
}
