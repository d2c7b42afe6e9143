//! The dispatcher binary for the eval tests: the same `agentfleet_dispatcher::cli::main` as the
//! shipped `agentfleet-dispatcher`, built inside this package so tests find it beside the test
//! binaries and run it as a process.

fn main() -> std::process::ExitCode {
    agentfleet_dispatcher::cli::main()
}
