//! Test support for agentfleet: the scripted model server and the tool server (also used by the local
//! demo), and the harness that starts a fleet of real processes against real RabbitMQ and Redis.

pub mod bench;
pub mod chaos;
pub mod demo_goals;
pub mod engine_rig;
pub mod fleet;
pub mod model_server;
pub mod openai_server;
pub mod otlp_collector;
pub mod process;
pub mod serve;
pub mod stats;
pub mod tool_server;
