//! The worker binary for the fault tests: the same `agentfleet_worker::cli::main` as the shipped
//! `agentfleet-worker`, built inside this package so tests can find it (`CARGO_BIN_EXE_…`) and kill it.

/// mimalloc: the step path allocates many short-lived buffers, and glibc malloc cost a quarter of
/// the worker's CPU (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    agentfleet_worker::cli::main()
}
