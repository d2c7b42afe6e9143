//! `agentfleet-dispatcher`: the HTTP API, until SIGTERM.

/// mimalloc: the step path allocates many short-lived buffers, and glibc malloc cost a quarter of
/// the worker's CPU (docs/BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    agentfleet_dispatcher::cli::main()
}
