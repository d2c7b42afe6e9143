//! Injected tool failures and latency, globally and per tool (`POST /admin/behaviour`).
//!
//! A failing call still counts in the stats: the point is to see whether a client retries with the
//! same `Idempotency-Key`.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The status failures use unless told otherwise.
const DEFAULT_FAIL_STATUS: u16 = 503;

/// How every tool behaves, with per-tool overrides. Missing JSON fields take their defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Behaviour {
    /// Probability a call fails. Default 0.
    pub fail_rate: f64,
    /// Status of a failed call. Default 503.
    pub fail_status: u16,
    /// Delay before every answer, in milliseconds. Default 0.
    pub latency_ms: u64,
    /// Overrides by tool name; a listed tool uses its entry instead of the fields above.
    pub tools: BTreeMap<String, ToolBehaviour>,
}

/// How one tool behaves. Missing JSON fields take their defaults.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct ToolBehaviour {
    /// Probability a call fails. Default 0.
    pub fail_rate: f64,
    /// Status of a failed call. Default 503.
    pub fail_status: u16,
    /// Delay before every answer, in milliseconds. Default 0.
    pub latency_ms: u64,
}

impl Default for Behaviour {
    fn default() -> Self {
        let base = ToolBehaviour::default();
        Self {
            fail_rate: base.fail_rate,
            fail_status: base.fail_status,
            latency_ms: base.latency_ms,
            tools: BTreeMap::new(),
        }
    }
}

impl Default for ToolBehaviour {
    fn default() -> Self {
        Self { fail_rate: 0.0, fail_status: DEFAULT_FAIL_STATUS, latency_ms: 0 }
    }
}

/// A behaviour with a rate outside `0..=1` or a status that is not an HTTP error status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidBehaviour(String);

impl fmt::Display for InvalidBehaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidBehaviour {}

impl Behaviour {
    /// What applies to `tool`: its override, else the global fields.
    pub fn for_tool(&self, tool: &str) -> ToolBehaviour {
        let global =
            ToolBehaviour { fail_rate: self.fail_rate, fail_status: self.fail_status, latency_ms: self.latency_ms };
        self.tools.get(tool).copied().unwrap_or(global)
    }

    /// Checks the global fields and every override.
    pub fn validate(&self) -> Result<(), InvalidBehaviour> {
        self.for_tool("").validate("")?;
        self.tools.iter().try_for_each(|(name, tool)| tool.validate(&format!("tools.{name}.")))
    }
}

impl ToolBehaviour {
    fn validate(&self, prefix: &str) -> Result<(), InvalidBehaviour> {
        if !(0.0..=1.0).contains(&self.fail_rate) {
            return Err(InvalidBehaviour(format!("{prefix}fail_rate must be between 0 and 1, got {}", self.fail_rate)));
        }
        if !(400..=599).contains(&self.fail_status) {
            return Err(InvalidBehaviour(format!("{prefix}fail_status must be 400..=599, got {}", self.fail_status)));
        }
        Ok(())
    }

    /// The delay before answering.
    pub(crate) fn delay(&self) -> Duration {
        Duration::from_millis(self.latency_ms)
    }

    /// Draws whether this call fails.
    pub(crate) fn draw_failure(&self) -> bool {
        rand::random::<f64>() < self.fail_rate
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_replace_the_global_fields() {
        let json = r#"{"fail_rate": 0.5, "tools": {"lookup_customer": {"fail_rate": 1.0, "fail_status": 500}}}"#;
        let behaviour: Behaviour = serde_json::from_str(json).expect("json");
        assert_eq!(behaviour.for_tool("other"), ToolBehaviour { fail_rate: 0.5, fail_status: 503, latency_ms: 0 });
        assert_eq!(behaviour.for_tool("lookup_customer").fail_status, 500);
        assert!(behaviour.for_tool("lookup_customer").draw_failure());
        assert!(!Behaviour::default().for_tool("x").draw_failure());
    }

    #[test]
    fn validation() {
        assert!(Behaviour::default().validate().is_ok());
        assert!(Behaviour { fail_rate: 2.0, ..Behaviour::default() }.validate().is_err());
        assert!(Behaviour { fail_status: 200, ..Behaviour::default() }.validate().is_err());
        let mut bad_override = Behaviour::default();
        bad_override.tools.insert("t".to_owned(), ToolBehaviour { fail_rate: f64::NAN, ..ToolBehaviour::default() });
        let error = bad_override.validate().expect_err("nan");
        assert!(error.to_string().starts_with("tools.t.fail_rate"));
    }
}
