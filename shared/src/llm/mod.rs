//! Model clients: the Anthropic Messages API, and OpenAI-compatible chat completions for local
//! models. Both return replies in the Messages API's shape, so the engine treats them alike.
//!
//! Content blocks are kept as the raw JSON the API sent ([`RawBlock`]), and parsed only into a view
//! ([`Block`]) for the parts the fleet acts on (`text`, `tool_use`). Blocks of any other type —
//! `thinking` with its signature, `redacted_thinking`, server-tool blocks — go back to the API byte
//! for byte, as it requires.

pub mod anthropic;
pub mod openai;
pub mod types;

pub use anthropic::AnthropicClient;
pub use openai::OpenAiClient;
pub use types::{
    Block, CallSpec, LlmError, ModelReply, RawBlock, StopReason, ToolOutcome, ToolUse, Usage, assistant_message,
    stored_content, text_of, tool_results_message, user_message,
};

pub use crate::domain::Provider;

/// The model clients of a process, one per provider; each agent names the one it uses.
#[derive(Clone)]
pub struct ModelClients {
    anthropic: AnthropicClient,
    openai: OpenAiClient,
}

impl ModelClients {
    /// Both clients, from the config.
    pub fn new(cfg: &crate::config::Config) -> Result<Self, LlmError> {
        Ok(Self { anthropic: AnthropicClient::new(&cfg.anthropic)?, openai: OpenAiClient::new(&cfg.openai)? })
    }

    /// Sends the conversation to `provider` and returns the reply in the Messages API's shape.
    pub async fn create_message(
        &self,
        provider: Provider,
        spec: &CallSpec<'_>,
        messages: &[RawBlock],
    ) -> Result<ModelReply, LlmError> {
        match provider {
            Provider::Anthropic => self.anthropic.create_message(spec, messages).await,
            Provider::Openai => self.openai.create_message(spec, messages).await,
        }
    }
}
