//! The chaos suite (`agentfleet-chaos`): a fleet of worker processes on a private Redis and
//! RabbitMQ, a mix of sessions in flight, faults injected while they run (worker SIGKILLs, a
//! SIGSTOP past the lease, a broker restart, a Redis kill -9 with AOF, a model 529 storm, a tool
//! outage), then checks that count what held and what broke. See `docs/RELIABILITY.md`.

pub mod checks;
pub mod run;
pub mod services;
pub mod workload;
