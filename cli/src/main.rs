//! `agentfleet`: the command-line client of the dispatcher's HTTP API (see the library).

fn main() -> std::process::ExitCode {
    agentfleet_cli::main()
}
