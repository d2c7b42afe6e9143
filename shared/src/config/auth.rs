//! `[auth]`: who may use the fleet, and as which tenant.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::domain::TenantId;

/// Credentials and the tenants they act for.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuthConfig {
    /// The tenant of each RabbitMQ user that may publish session requests to the requests queue:
    /// `amqp_users = { billing-system = "acme" }`. A request's user is its `user_id` property, which
    /// RabbitMQ checks against the publishing connection's user. Default: none, so the AMQP intake
    /// refuses every request until users are mapped.
    #[serde(default)]
    pub amqp_users: BTreeMap<String, TenantId>,
}

impl AuthConfig {
    /// The tenant the RabbitMQ user `user` publishes for, if it is mapped.
    pub fn amqp_tenant(&self, user: &str) -> Option<&TenantId> {
        self.amqp_users.get(user)
    }
}
