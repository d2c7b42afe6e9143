//! Where output goes: text for people, or one JSON document for scripts.
//!
//! With `--json`, stdout holds only the document; progress lines go to stderr. Writes return errors
//! instead of panicking like `println!` does when stdout is closed.

use std::io::Write;

use serde_json::Value;

/// The output mode of this run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Output {
    /// True with `--json`.
    pub(crate) json: bool,
}

impl Output {
    /// A line of the result, for people (ignored with `--json`, whose document says it all).
    pub(crate) fn line(&self, text: &str) -> anyhow::Result<()> {
        if self.json { Ok(()) } else { write_line(&mut std::io::stdout().lock(), text) }
    }

    /// Lines of the result, for people.
    pub(crate) fn lines(&self, lines: &[String]) -> anyhow::Result<()> {
        lines.iter().try_for_each(|l| self.line(l))
    }

    /// A progress line: stdout for people, stderr beside a JSON document.
    pub(crate) fn progress(&self, text: &str) -> anyhow::Result<()> {
        if self.json { write_line(&mut std::io::stderr().lock(), text) } else { self.line(text) }
    }

    /// The JSON document, with `--json`.
    pub(crate) fn document(&self, v: &Value) -> anyhow::Result<()> {
        if !self.json {
            return Ok(());
        }
        let text = serde_json::to_string_pretty(v)?;
        write_line(&mut std::io::stdout().lock(), &text)
    }
}

fn write_line(w: &mut impl Write, text: &str) -> anyhow::Result<()> {
    writeln!(w, "{text}")?;
    w.flush()?;
    Ok(())
}
