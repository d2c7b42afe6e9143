//! API tokens, their roles and tenants, and the fleet-wide defaults of per-tenant limits.
//!
//! A token is never in the file: only its SHA-256, inline (`sha256`), from an environment
//! variable (`sha256_env`) or from a mounted secret file (`sha256_file`). Make a token with e.g.
//! `openssl rand -hex 32`, and its hash with `printf %s "$TOKEN" | sha256sum`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;

use serde::Deserialize;

use super::{Invalid, Problem};
use crate::domain::{Name, TenantId};

/// `[auth]`: who may call the API.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The API tokens (`[[auth.tokens]]`). With none, every API route answers 401.
    pub tokens: Vec<TokenConfig>,
    /// Sessions one token may create per minute, unless the token sets its own. Default 600.
    pub sessions_per_minute: Option<u32>,
    /// The tenant of each RabbitMQ user that may publish session requests to the requests queue:
    /// `amqp_users = { billing-system = "acme" }`. A request's user is its `user_id` property, which
    /// RabbitMQ checks against the publishing connection's user. Default: none, so the AMQP intake
    /// refuses every request until users are mapped.
    pub amqp_users: BTreeMap<String, TenantId>,
}

impl AuthConfig {
    /// The tenant the RabbitMQ user `user` publishes for, if it is mapped.
    pub fn amqp_tenant(&self, user: &str) -> Option<&TenantId> {
        self.amqp_users.get(user)
    }

    /// Sessions per minute of `token`.
    pub fn rate_of(&self, token: &TokenConfig) -> u32 {
        token.sessions_per_minute.or(self.sessions_per_minute).unwrap_or(600)
    }
}

/// One API token (`[[auth.tokens]]`).
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// What logs call it; unique.
    pub name: Name,
    /// The tenant its sessions belong to.
    pub tenant: Name,
    /// What it may do: `submit`, `read`, `operate`, `approve`, `admin`.
    pub roles: Vec<Role>,
    /// The token's SHA-256, 64 hex digits.
    #[serde(default)]
    pub sha256: Option<String>,
    /// An environment variable holding the SHA-256.
    #[serde(default)]
    pub sha256_env: Option<String>,
    /// A file holding the SHA-256 (a mounted secret).
    #[serde(default)]
    pub sha256_file: Option<PathBuf>,
    /// Sessions this token may create per minute; default `auth.sessions_per_minute`.
    #[serde(default)]
    pub sessions_per_minute: Option<u32>,
    /// The hash, resolved from whichever source is set.
    #[serde(skip)]
    pub hash: [u8; 32],
}

impl fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenConfig")
            .field("name", &self.name)
            .field("tenant", &self.tenant)
            .field("roles", &self.roles)
            .finish_non_exhaustive()
    }
}

impl TokenConfig {
    /// True when the token has `role` (or `admin`).
    pub fn grants(&self, role: Role) -> bool {
        self.roles.iter().any(|r| *r == role || *r == Role::Admin)
    }

    /// True when the token is an admin: every role, every tenant.
    pub fn is_admin(&self) -> bool {
        self.roles.contains(&Role::Admin)
    }

    /// Reads the hash from its one source.
    pub(super) fn resolve(&mut self, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Invalid> {
        let text = match (&self.sha256, &self.sha256_env, &self.sha256_file) {
            (Some(h), None, None) => (h.clone(), "sha256"),
            (None, Some(var), None) => {
                let v = env(var).filter(|v| !v.is_empty());
                (v.ok_or_else(|| Invalid::new("sha256_env", Problem::EnvUnset(var.clone())))?, "sha256_env")
            }
            (None, None, Some(path)) => {
                let v = std::fs::read_to_string(path).map_err(|e| {
                    Invalid::new("sha256_file", Problem::Unreadable(format!("{}: {e}", path.display())))
                })?;
                (v, "sha256_file")
            }
            _ => return Err(Invalid::new("sha256", Problem::OneHashSource)),
        };
        let (value, field) = text;
        let bytes = hex::decode(value.trim()).ok().filter(|b| b.len() == 32);
        let bytes = bytes.ok_or_else(|| Invalid::new(field, Problem::NotASha256))?;
        self.hash.copy_from_slice(&bytes);
        if self.roles.is_empty() {
            return Err(Invalid::new("roles", Problem::NoRoles));
        }
        Ok(())
    }
}

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Create sessions.
    Submit,
    /// Show, list and trace sessions.
    Read,
    /// Reply to and cancel sessions; list escalations.
    Operate,
    /// Approve and reject tool calls.
    Approve,
    /// Everything, for every tenant.
    Admin,
}

impl Role {
    /// Its name in the config.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Read => "read",
            Self::Operate => "operate",
            Self::Approve => "approve",
            Self::Admin => "admin",
        }
    }
}

/// `[tenant_defaults]`: the limits of a tenant without its own in `[tenants]`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TenantDefaults {
    /// Spend cap per UTC day of a tenant without its own, USD. Required: never unlimited.
    pub daily_cap_usd: Option<f64>,
    /// Live (not ended) sessions per tenant without its own limit. Default 1000.
    pub max_live_sessions: Option<u32>,
}

pub(super) fn validate_auth(auth: &mut AuthConfig, env: &dyn Fn(&str) -> Option<String>) -> Result<(), Invalid> {
    for (i, token) in auth.tokens.iter_mut().enumerate() {
        token.resolve(env).map_err(|e| e.within(&format!("auth.tokens[{i}]")))?;
    }
    for (i, token) in auth.tokens.iter().enumerate() {
        if auth.tokens[..i].iter().any(|t| t.name == token.name) {
            return Err(Invalid::new(format!("auth.tokens[{i}].name"), Problem::Duplicate(token.name.to_string())));
        }
        if token.sessions_per_minute == Some(0) {
            return Err(Invalid::new(format!("auth.tokens[{i}].sessions_per_minute"), Problem::AtLeast(1)));
        }
    }
    Ok(())
}
