#!/usr/bin/env bash
# The project's test command: services, formatting, lints, then the whole test suite.
#
# Usage: bash scripts/test.sh   (from any directory)
# The integration tests use the RabbitMQ and Redis that scripts/services.sh makes sure of; they read
# AMQP_URL and REDIS_URL with localhost defaults.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> %s\n' "$*"; }

step "services (RabbitMQ, Redis)"
bash scripts/services.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

step "all checks passed"
