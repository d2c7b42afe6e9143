//! The agents as the engine runs them: config resolved once, tools built, prices known.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use crate::budget::CallShape;
use crate::config::{AgentConfig, BudgetConfig, Config, OnModelFailure, Price, ProviderConfig, WaitConfig};
use crate::domain::{MicroUsd, Name, SessionStatus, TenantId};
use crate::llm::{CacheSpec, Provider};
use crate::tools::{ToolLimits, ToolSet, ToolSetupError};

/// An agent as the engine runs it: config resolved, tools built, prices known.
pub struct Agent {
    /// Its name.
    pub name: Name,
    /// The model id.
    pub model: String,
    /// The API the model speaks.
    pub provider: Provider,
    /// The system prompt.
    pub system: String,
    /// `max_tokens` per call.
    pub max_tokens: u32,
    /// The worker pool.
    pub pool: Name,
    /// Its tools.
    pub tools: ToolSet,
    /// The model's price.
    pub price: Price,
    /// What its calls are planned from.
    pub shape: CallShape,
    /// Its prompt-cache breakpoints: `None` when its calls mark none.
    pub cache: Option<CacheSpec>,
    /// The agent's budget settings (limits, daily cap, what to do at the cap).
    pub budget: BudgetConfig,
    /// What to do when the model cannot be reached.
    pub on_model_failure: OnModelFailure,
    /// The wait for a human's reply.
    pub human_wait: WaitConfig,
    /// The wait for an approval.
    pub approval_wait: WaitConfig,
}

impl Agent {
    /// Seconds a session of this agent waits in `status` before its deadline.
    pub fn wait_deadline_s(&self, status: SessionStatus) -> u64 {
        if status == SessionStatus::AwaitingApproval {
            self.approval_wait.deadline_s
        } else {
            self.human_wait.deadline_s
        }
    }
}

/// Every configured agent, by name, the tenants' daily caps, and the providers' protections.
pub struct Agents {
    agents: HashMap<String, Arc<Agent>>,
    tenant_caps: HashMap<String, u64>,
    /// The cap of a tenant without its own (`tenant_defaults.daily_cap_usd`).
    default_tenant_cap: u64,
    providers: BTreeMap<Provider, ProviderConfig>,
}

impl Agents {
    /// Builds every agent of `cfg`; `env` supplies tool header values.
    pub fn build(cfg: &Config, env: &dyn Fn(&str) -> Option<String>) -> Result<Self, ToolSetupError> {
        let mut agents = HashMap::new();
        for (name, a) in &cfg.agents {
            let tools = ToolSet::build(&a.tools, &cfg.tools, env, tool_limits(cfg))?;
            // Config validation rejects an agent whose model has no price.
            let price = cfg.price(&a.model).copied().unwrap_or(FREE);
            let agent = Agent {
                shape: CallShape::new(&a.system_prompt, tools.definitions().get(), a.max_tokens, &price, a.cache_ttl()),
                cache: a.cache_ttl().map(|ttl| CacheSpec { ttl, min_tokens: price.min_cache_tokens() }),
                name: name.clone(),
                model: a.model.clone(),
                provider: a.provider,
                system: a.system_prompt.clone(),
                max_tokens: a.max_tokens,
                pool: a.pool.clone(),
                tools,
                price,
                budget: a.budget.clone(),
                on_model_failure: a.on_model_failure,
                human_wait: a.human_wait,
                approval_wait: a.approval_wait,
            };
            agents.insert(name.to_string(), Arc::new(agent));
        }
        let tenant_caps = cfg
            .tenants
            .iter()
            .filter_map(|(n, t)| Some((n.to_string(), MicroUsd::from_usd(t.daily_cap_usd?).ok()?.get())))
            .collect();
        let default_tenant_cap =
            cfg.tenant_defaults.daily_cap_usd.and_then(|usd| MicroUsd::from_usd(usd).ok()).map_or(0, MicroUsd::get);
        Ok(Self { agents, tenant_caps, default_tenant_cap, providers: cfg.providers.clone() })
    }

    /// The protections of `provider` (defaults when not configured).
    pub fn provider(&self, provider: Provider) -> ProviderConfig {
        self.providers.get(&provider).cloned().unwrap_or_default()
    }

    /// The agent named `name`.
    pub fn get(&self, name: &str) -> Option<&Arc<Agent>> {
        self.agents.get(name)
    }

    /// The daily cap of `tenant`, micro-USD: its own, else the fleet's default (never unlimited).
    pub fn tenant_cap(&self, tenant: &TenantId) -> Option<u64> {
        Some(self.tenant_caps.get(tenant.as_str()).copied().unwrap_or(self.default_tenant_cap))
    }

    /// The pools of all agents, each once.
    pub fn pools(&self) -> Vec<Name> {
        let mut pools: Vec<Name> = self.agents.values().map(|a| a.pool.clone()).collect();
        pools.sort();
        pools.dedup();
        pools
    }
}

/// The shape of the calls of agent `a` of `cfg`, as the worker plans them (the dispatcher plans a
/// session's first call with it). `None` when its tool definitions do not serialize.
pub fn call_shape(cfg: &Config, a: &AgentConfig) -> Option<CallShape> {
    let definitions = crate::tools::definitions(&a.tools, &cfg.tools).ok()?;
    let price = cfg.price(&a.model).copied().unwrap_or(FREE);
    Some(CallShape::new(&a.system_prompt, definitions.get(), a.max_tokens, &price, a.cache_ttl()))
}

fn tool_limits(cfg: &Config) -> ToolLimits {
    ToolLimits {
        max_inline_wait: Duration::from_millis(cfg.worker.max_inline_retry_ms),
        max_result_bytes: cfg.worker.max_tool_result_bytes,
        max_input_bytes: cfg.worker.max_tool_input_bytes,
    }
}

const FREE: Price = Price::new(0.0, 0.0);
