//! `agentfleet-worker`: runs agent steps from RabbitMQ until SIGTERM.

fn main() -> std::process::ExitCode {
    agentfleet_worker::cli::main()
}
