//! The worker binary for the fault tests: the same `agentfleet_worker::cli::main` as the shipped
//! `agentfleet-worker`, built inside this package so tests can find it (`CARGO_BIN_EXE_…`) and kill it.

fn main() -> std::process::ExitCode {
    agentfleet_worker::cli::main()
}
