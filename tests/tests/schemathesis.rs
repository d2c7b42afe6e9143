//! Schemathesis (from PyPI) against a live dispatcher: requests generated from `GET /openapi.json`,
//! valid and invalid, must be answered as the document says. A schema-valid request the server
//! refuses, a schema-invalid one it accepts, a 5xx, or an answer off its schema fails the test.
//!
//! The run takes the schema's URL, the API's base URL and an optional `Authorization` header, so it
//! follows the document wherever it is served and whatever credential the API asks for. It is bounded
//! (examples per operation and a time budget) to keep the suite fast. `tests/schemathesis.toml`
//! counts a 413 as a refusal.

use std::time::Duration;

use agentfleet_tests::fleet::{FleetOptions, TestFleet};
use anyhow::{Context, ensure};

/// Examples per operation and phase, and the whole run's time budget.
const MAX_EXAMPLES: &str = "25";
const MAX_TIME_S: &str = "60";
/// A fixed seed, so a failure can be reproduced with the same command line.
const SEED: &str = "20261130";

/// What schemathesis tests: where the document is, where the API is, and how to authenticate.
struct Target {
    schema_url: String,
    base_url: String,
    /// `Bearer <token>`, when the API asks for one.
    authorization: Option<String>,
    /// Which operations: `--include-tag operations` for the ops listener, `--exclude-tag operations`
    /// for the API's.
    filter: &'static [&'static str],
}

/// Fails, naming the fix, when schemathesis cannot run (`bash scripts/test.sh` installs it).
async fn ensure_schemathesis() -> anyhow::Result<()> {
    let probe = tokio::process::Command::new("python3")
        .args(["-m", "schemathesis.cli", "--version"])
        .output()
        .await
        .context("running python3 (is it installed?)")?;
    ensure!(
        probe.status.success(),
        "schemathesis is missing: install it with `python3 -m pip install schemathesis`, which \
         `bash scripts/test.sh` does:\n{}",
        String::from_utf8_lossy(&probe.stderr)
    );
    Ok(())
}

/// Runs `schemathesis run` with every check; its exit status and what it printed.
async fn schemathesis(target: &Target) -> anyhow::Result<(bool, String)> {
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/schemathesis.toml");
    let mut args = vec![
        "-m",
        "schemathesis.cli",
        "--config-file",
        config,
        "run",
        &target.schema_url,
        "--url",
        &target.base_url,
        "--checks",
        "all",
        "--max-examples",
        MAX_EXAMPLES,
        "--max-time",
        MAX_TIME_S,
        "--seed",
        SEED,
        "--request-timeout",
        "10",
        "--generation-database",
        "none",
        "--no-color",
    ];
    args.extend(target.filter.iter().copied());
    let header = target.authorization.as_ref().map(|a| format!("Authorization: {a}"));
    if let Some(h) = &header {
        args.extend(["--header", h]);
    }
    // In the temporary directory, where schemathesis may leave its `.schemathesis/` state.
    let run = tokio::process::Command::new("python3")
        .args(&args)
        .current_dir(std::env::temp_dir())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(300), run).await.context("schemathesis ran for 5 minutes")??;
    let printed = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    Ok((out.status.success(), printed))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schemathesis_finds_no_failure_in_the_api() -> anyhow::Result<()> {
    ensure_schemathesis().await?;
    let fleet = TestFleet::start(FleetOptions { workers: 0, ..Default::default() }).await?;
    let schema_url = format!("{}/openapi.json", fleet.ops);
    // The API's operations on its listener, with a valid token; the ops endpoints on theirs.
    let api = Target {
        schema_url: schema_url.clone(),
        base_url: fleet.api.clone(),
        authorization: Some(format!("Bearer {}", agentfleet_tests::fleet::ADMIN_TOKEN)),
        // The event stream of a session that never ends (this fleet has no workers) never ends
        // either, nor does the tenant's, and schemathesis reads a stream to its end:
        // tests/tests/events.rs covers both.
        filter: &[
            "--exclude-tag",
            "operations",
            "--exclude-path",
            "/v1/sessions/{id}/events",
            "--exclude-path",
            "/v1/events",
        ],
    };
    let ops = Target {
        schema_url,
        base_url: fleet.ops.clone(),
        authorization: None,
        filter: &["--include-tag", "operations"],
    };
    for target in [api, ops] {
        let (passed, printed) = schemathesis(&target).await?;
        println!("{printed}");
        ensure!(passed, "schemathesis reported failures against {}:\n{printed}", target.base_url);
    }
    fleet.cleanup().await
}
