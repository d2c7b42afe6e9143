#!/usr/bin/env bash
# The project's test command: services, formatting, lints, then the whole test suite.
#
# Usage: bash scripts/test.sh   (from any directory)
# The integration tests use the RabbitMQ and Redis that scripts/services.sh makes sure of; they read
# AMQP_URL and REDIS_URL with localhost defaults.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> [%ss] %s\n' "$SECONDS" "$*"; }

step "services (RabbitMQ, Redis)"
bash scripts/services.sh

# promtool (Debian's `prometheus` package) for tests/tests/observability_promtool.rs.
as_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
step "promtool"
command -v promtool >/dev/null ||
    (as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus >/dev/null 2>&1 ||
        (as_root env DEBIAN_FRONTEND=noninteractive apt-get update &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus))
# The openapi test validates the API's document with this (it installs it itself if this fails).
python3 -m pip install --quiet openapi-spec-validator || true

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

step "all checks passed"
