//! The `agentfleet` CLI for the CLI tests: the same `agentfleet_cli::main` as the shipped binary,
//! built inside this package so tests find it beside the test binaries and run it as a process.

fn main() -> std::process::ExitCode {
    agentfleet_cli::main()
}
