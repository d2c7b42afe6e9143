//! Failpoints: named places where a test can make the process die by SIGKILL, exactly there.
//!
//! `AGENTFLEET_FAILPOINT=<name>` arms one failpoint for the life of the process; the first time
//! execution reaches it, the process sends itself SIGKILL (no unwinding, no cleanup — like a node
//! failure). Unset, a failpoint costs one load of a static.

use std::sync::OnceLock;

static ARMED: OnceLock<Option<String>> = OnceLock::new();

/// Dies by SIGKILL here if the failpoint `name` is armed.
pub fn hit(name: &str) {
    let armed = ARMED.get_or_init(|| std::env::var("AGENTFLEET_FAILPOINT").ok().filter(|v| !v.is_empty()));
    if armed.as_deref() == Some(name) {
        tracing::warn!(failpoint = name, "failpoint reached: killing this process");
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
}
