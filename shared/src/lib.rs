//! agentfleet: a durable, queue-driven fleet of stateless workers that runs LLM agents.
//!
//! This crate is the library both binaries are thin shells around: domain types, configuration,
//! the Redis session store, the RabbitMQ topology and publisher, the Anthropic client, tools, the
//! step engine and telemetry. See `docs/ARCHITECTURE.md` for how the parts fit.

pub mod amqp;
pub mod breaker;
pub mod budget;
pub mod config;
pub mod domain;
pub mod failpoint;
pub mod guard;
pub mod http_body;
pub mod lifecycle;
pub mod llm;
pub mod ratelimit;
pub mod redis_conn;
pub mod scrub;
pub mod shutdown;
pub mod step;
pub mod store;
pub mod telemetry;
pub mod tools;
pub mod webhooks;
