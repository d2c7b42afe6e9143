//! A run's report: a table for people, JSON for tools (and `--baseline`), JUnit XML for CI.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

use super::verdict::Verdict;

/// A whole run, as `--out` writes it and `--baseline` reads it.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Report {
    pub(crate) suite: String,
    /// What answered the model calls: `scripted`, `api`, `replay` (and what that means).
    pub(crate) model: String,
    pub(crate) model_note: String,
    pub(crate) summary: Summary,
    pub(crate) cases: Vec<Verdict>,
}

/// Totals over the cases.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Summary {
    pub(crate) cases: usize,
    pub(crate) passed: usize,
    pub(crate) failed: usize,
    pub(crate) pass_rate: f64,
    pub(crate) escalation_rate: f64,
    pub(crate) mean_steps: f64,
    pub(crate) total_cost_usd: f64,
    pub(crate) mean_cost_usd: f64,
    pub(crate) replay_mismatches: usize,
}

impl Report {
    pub(crate) fn new(suite: String, model: String, model_note: String, cases: Vec<Verdict>) -> Self {
        let n = cases.len();
        let passed = cases.iter().filter(|c| c.passed).count();
        let rate = |k: usize| if n == 0 { 0.0 } else { k as f64 / n as f64 };
        let total_cost_usd: f64 = cases.iter().map(|c| c.cost_usd).sum();
        let summary = Summary {
            cases: n,
            passed,
            failed: n - passed,
            pass_rate: rate(passed),
            escalation_rate: rate(cases.iter().filter(|c| c.escalated).count()),
            mean_steps: if n == 0 { 0.0 } else { cases.iter().map(|c| c.steps).sum::<u64>() as f64 / n as f64 },
            total_cost_usd,
            mean_cost_usd: if n == 0 { 0.0 } else { total_cost_usd / n as f64 },
            replay_mismatches: cases.iter().filter(|c| !c.replay_mismatches.is_empty()).count(),
        };
        Self { suite, model, model_note, summary, cases }
    }

    /// The table for people: one row per case, then each failure's reasons, then the totals.
    pub(crate) fn table(&self) -> String {
        let width = self.cases.iter().map(|c| c.id.len()).max().unwrap_or(4).max(4);
        let mut out = format!("suite {}: {}\n\n", self.suite, self.model_note);
        out += &format!(
            "{:<width$}  {:<6}  {:<17}  {:>5}  {:>10}  {}\n",
            "case", "result", "status", "steps", "cost $", "escalated"
        );
        for c in &self.cases {
            let result = if c.passed { "pass" } else { "FAIL" };
            let escalated = if c.escalated { "yes" } else { "no" };
            out += &format!(
                "{:<width$}  {result:<6}  {:<17}  {:>5}  {:>10.6}  {escalated}\n",
                c.id, c.status, c.steps, c.cost_usd
            );
        }
        let failed: Vec<&Verdict> = self.cases.iter().filter(|c| !c.passed).collect();
        if !failed.is_empty() {
            out += "\nfailures:\n";
            for c in failed {
                out +=
                    &format!("  {}{}\n", c.id, c.session_id.as_deref().map(|s| format!(" ({s})")).unwrap_or_default());
                for why in &c.failures {
                    out += &format!("    - {why}\n");
                }
            }
        }
        let s = &self.summary;
        out += &format!(
            "\n{} of {} passed ({:.1} %), escalation rate {:.1} %, {:.1} steps and {:.6} USD a case, {:.6} USD in all",
            s.passed,
            s.cases,
            s.pass_rate * 100.0,
            s.escalation_rate * 100.0,
            s.mean_steps,
            s.mean_cost_usd,
            s.total_cost_usd
        );
        if s.replay_mismatches > 0 {
            out += &format!("; {} case(s) did not match the recording", s.replay_mismatches);
        }
        out.push('\n');
        out
    }

    /// JUnit XML: one test suite, one test case per case, a failure with every reason.
    pub(crate) fn junit(&self) -> anyhow::Result<String> {
        use quick_junit::{NonSuccessKind, Report as JReport, TestCase, TestCaseStatus, TestSuite};
        let mut suite = TestSuite::new(self.suite.as_str());
        for c in &self.cases {
            let status = if c.passed {
                TestCaseStatus::success()
            } else {
                let mut status = TestCaseStatus::non_success(NonSuccessKind::Failure);
                status.set_message(c.failures.first().cloned().unwrap_or_default());
                status.set_description(c.failures.join("\n"));
                status
            };
            let mut case = TestCase::new(c.id.as_str(), status);
            case.set_classname(format!("agentfleet.eval.{}", self.suite));
            case.set_time(std::time::Duration::from_millis(c.duration_ms));
            case.set_system_out(format!(
                "session {}\nstatus {}, {} steps, {:.6} USD, escalated: {}\ntools: {}\nanswer: {}",
                c.session_id.as_deref().unwrap_or("-"),
                c.status,
                c.steps,
                c.cost_usd,
                c.escalated,
                c.tools_called.join(", "),
                c.answer
            ));
            suite.add_test_case(case);
        }
        let mut report = JReport::new("agentfleet eval");
        report.add_test_suite(suite);
        Ok(report.to_string()?)
    }
}

/// How two runs differ, case by case.
#[derive(Debug, Default, Serialize)]
pub(crate) struct Comparison {
    pub(crate) regressed: Vec<String>,
    pub(crate) improved: Vec<String>,
    pub(crate) new: Vec<String>,
    pub(crate) missing: Vec<String>,
}

/// Reads a report written by `--out`.
pub(crate) fn read_baseline(path: &Path) -> anyhow::Result<Report> {
    let text = std::fs::read(path).with_context(|| format!("--baseline {}: cannot read it", path.display()))?;
    serde_json::from_slice(&text)
        .with_context(|| format!("--baseline {}: not a report written by --out", path.display()))
}

/// `now` against `before`: which cases went from pass to fail, and back.
pub(crate) fn compare(before: &Report, now: &Report) -> Comparison {
    let then: BTreeMap<&str, bool> = before.cases.iter().map(|c| (c.id.as_str(), c.passed)).collect();
    let mut out = Comparison::default();
    for c in &now.cases {
        match then.get(c.id.as_str()) {
            Some(true) if !c.passed => out.regressed.push(c.id.clone()),
            Some(false) if c.passed => out.improved.push(c.id.clone()),
            None => out.new.push(c.id.clone()),
            _ => {}
        }
    }
    let ids: std::collections::HashSet<&str> = now.cases.iter().map(|c| c.id.as_str()).collect();
    out.missing = then.keys().filter(|id| !ids.contains(*id)).map(|id| (*id).to_owned()).collect();
    out
}

impl Comparison {
    /// The comparison for people; `now` gives each regression's reasons.
    pub(crate) fn text(&self, baseline: &Path, now: &Report) -> String {
        let mut out = format!("\nagainst the baseline {}:\n", baseline.display());
        if self.regressed.is_empty() && self.improved.is_empty() && self.new.is_empty() && self.missing.is_empty() {
            return out + "  no case changed its verdict\n";
        }
        for id in &self.regressed {
            let why =
                now.cases.iter().find(|c| &c.id == id).and_then(|c| c.failures.first()).cloned().unwrap_or_default();
            out += &format!("  REGRESSED {id}: {why}\n");
        }
        for id in &self.improved {
            out += &format!("  improved  {id}\n");
        }
        for id in &self.new {
            out += &format!("  new       {id}\n");
        }
        for id in &self.missing {
            out += &format!("  missing   {id} (in the baseline, not in this run)\n");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verdict(id: &str, passed: bool) -> Verdict {
        Verdict {
            id: id.into(),
            about: String::new(),
            tags: vec![],
            passed,
            failures: if passed { vec![] } else { vec![format!("{id} & <broke>")] },
            replay_mismatches: vec![],
            session_id: None,
            status: "completed".into(),
            steps: 3,
            cost_usd: 0.01,
            escalated: passed,
            tools_called: vec![],
            person: vec![],
            answer: String::new(),
            duration_ms: 5,
        }
    }

    #[test]
    fn baselines_name_regressions_and_improvements() {
        let before = Report::new(
            "s".into(),
            "m".into(),
            "n".into(),
            vec![verdict("a", true), verdict("b", false), verdict("gone", true)],
        );
        let now = Report::new(
            "s".into(),
            "m".into(),
            "n".into(),
            vec![verdict("a", false), verdict("b", true), verdict("c", true)],
        );
        let cmp = compare(&before, &now);
        assert_eq!(
            (cmp.regressed, cmp.improved, cmp.new, cmp.missing),
            (vec!["a".to_owned()], vec!["b".to_owned()], vec!["c".to_owned()], vec!["gone".to_owned()])
        );
        assert!((now.summary.pass_rate - 2.0 / 3.0).abs() < 1e-9);
    }

    #[test]
    fn junit_escapes_and_counts() -> anyhow::Result<()> {
        let report = Report::new("s".into(), "m".into(), "n".into(), vec![verdict("a", true), verdict("b", false)]);
        let xml = report.junit()?;
        assert!(xml.contains(r#"tests="2""#) && xml.contains(r#"failures="1""#), "{xml}");
        assert!(xml.contains("b &amp; &lt;broke&gt;"), "{xml}");
        Ok(())
    }
}
