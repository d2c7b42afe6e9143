//! Model clients: the Anthropic Messages API, and OpenAI-compatible chat completions for local
//! models. Both return replies in the Messages API's shape, so the engine treats them alike.
//!
//! Content blocks are kept as the raw JSON the API sent, and parsed only into a view ([`Block`]) for
//! the parts the fleet acts on (`text`, `tool_use`). Blocks of any other type — `thinking` with its
//! signature, `redacted_thinking`, server-tool blocks — go back to the API byte for byte, as it
//! requires.
//!
//! A call is written, then sent: [`ModelClients::request_body`] writes the whole request body from
//! the conversation ([`Conversation`]), and [`ModelClients::send`] sends it. The body owns its
//! bytes, so a caller can let the conversation go before it awaits the call.

pub mod anthropic;
pub mod cache;
pub mod conversation;
pub mod openai;
pub mod transport;
pub mod types;

pub use anthropic::AnthropicClient;
pub use cache::CacheSpec;
pub use conversation::{Conversation, MessagePlan};
pub use openai::OpenAiClient;
pub use types::{
    Block, CallSpec, LlmError, ModelReply, RawBlock, RequestBody, StopReason, ToolOutcome, ToolUse, Usage,
    assistant_message, stored_content, text_of, tool_results_message, user_blocks, user_message,
};

pub use crate::domain::Provider;

/// The model clients of a process, one per provider; each agent names the one it uses.
#[derive(Clone)]
pub struct ModelClients {
    anthropic: AnthropicClient,
    openai: OpenAiClient,
}

impl ModelClients {
    /// Both clients, from the config, with room for the calls a worker runs at once
    /// (`worker.concurrency`).
    pub fn new(cfg: &crate::config::Config) -> Result<Self, LlmError> {
        let calls_in_flight = usize::from(cfg.worker.concurrency);
        Ok(Self {
            anthropic: AnthropicClient::with_capacity(&cfg.anthropic, calls_in_flight)?,
            openai: OpenAiClient::with_capacity(&cfg.openai, calls_in_flight)?,
        })
    }

    /// The request body of a call to `provider`: the call's settings and the conversation, written
    /// into one buffer. It borrows nothing, so the conversation may be dropped before
    /// [`Self::send`].
    ///
    /// ```no_run
    /// # async fn step(llm: &agentfleet::llm::ModelClients, spec: &agentfleet::llm::CallSpec<'_>) -> Result<(), agentfleet::llm::LlmError> {
    /// use agentfleet::llm::{Conversation, Provider};
    /// let stored: Vec<String> = vec![agentfleet::llm::user_message("hi")];
    /// let body = llm.request_body(Provider::Anthropic, spec, Conversation::new(&stored))?;
    /// drop(stored);
    /// let _reply = llm.send(body).await?;
    /// # Ok(()) }
    /// ```
    pub fn request_body(
        &self,
        provider: Provider,
        spec: &CallSpec<'_>,
        messages: Conversation<'_>,
    ) -> Result<RequestBody, LlmError> {
        match provider {
            Provider::Anthropic => self.anthropic.request_body(spec, messages),
            Provider::Openai => self.openai.request_body(spec, messages),
        }
    }

    /// Sends a body written by [`Self::request_body`] to its provider and returns the reply in the
    /// Messages API's shape.
    pub async fn send(&self, body: RequestBody) -> Result<ModelReply, LlmError> {
        match body.provider() {
            Provider::Anthropic => self.anthropic.send(body).await,
            Provider::Openai => self.openai.send(body).await,
        }
    }

    /// Sends the conversation to `provider` and returns the reply in the Messages API's shape:
    /// [`Self::request_body`], then [`Self::send`].
    pub async fn create_message<'m>(
        &self,
        provider: Provider,
        spec: &CallSpec<'_>,
        messages: impl Into<Conversation<'m>>,
    ) -> Result<ModelReply, LlmError> {
        let body = self.request_body(provider, spec, messages.into())?;
        self.send(body).await
    }
}
