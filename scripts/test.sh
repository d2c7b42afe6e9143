#!/usr/bin/env bash
# The project's test command: services, formatting, lints, the whole test suite, then a reduced chaos
# run (docs/RELIABILITY.md).
#
# Usage: bash scripts/test.sh   (from any directory)
# The integration tests use the RabbitMQ and Redis that scripts/services.sh makes sure of; they read
# AMQP_URL and REDIS_URL with localhost defaults.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

step() { printf '\n==> [%ss] %s\n' "$SECONDS" "$*"; }

step "services (RabbitMQ, Redis)"
bash scripts/services.sh

# Queues of test fleets whose run was killed before its cleanup (older than 2 h): hundreds of them
# slow a broker's start and can exhaust its file descriptors.
python3 scripts/stale-test-queues.py

# Tools the tests use and never install themselves: promtool (Debian's `prometheus` package) for
# tests/tests/observability_promtool.rs, openapi-spec-validator for tests/tests/openapi.rs, schemathesis
# for tests/tests/schemathesis.rs.
as_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
step "promtool"
command -v promtool >/dev/null ||
    (as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus >/dev/null 2>&1 ||
        (as_root env DEBIAN_FRONTEND=noninteractive apt-get update &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y prometheus))
command -v promtool >/dev/null || {
    echo "promtool is still missing after installing Debian's prometheus package" >&2
    exit 1
}
step "openapi-spec-validator"
python3 -c 'import openapi_spec_validator' 2>/dev/null ||
    python3 -m pip install --quiet openapi-spec-validator ||
    echo "python3 -m pip install openapi-spec-validator failed" >&2
python3 -c 'import openapi_spec_validator' || {
    echo "openapi-spec-validator is missing and could not be installed with pip" >&2
    exit 1
}

step "schemathesis"
python3 -c 'import schemathesis' 2>/dev/null ||
    python3 -m pip install --quiet schemathesis ||
    echo "python3 -m pip install schemathesis failed" >&2
python3 -m schemathesis.cli --version >/dev/null || {
    echo "schemathesis is missing and could not be installed with pip" >&2
    exit 1
}

# The console's browser test (tests/tests/console_browser.rs) drives Debian's Chromium through
# chromedriver; Ubuntu's `chromium` is a snap stub, so there the two must come from elsewhere.
step "chromium and chromedriver"
command -v chromedriver >/dev/null ||
    (as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver >/dev/null 2>&1 ||
        (as_root env DEBIAN_FRONTEND=noninteractive apt-get update &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y chromium chromium-driver))
command -v chromedriver >/dev/null || {
    echo "chromedriver is still missing after installing Debian's chromium and chromium-driver packages" >&2
    exit 1
}

step "Kubernetes manifests (deploy/k8s)"
bash scripts/k8s-validate.sh

step "cargo fmt --all -- --check"
cargo fmt --all -- --check

step "cargo clippy --workspace --all-targets -- -D warnings"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test --workspace"
cargo test --workspace

# The example support agent's adversarial suite (docs/EVALS.md) against the scripted model: the fleet's
# guarantees on 60+ hostile inputs. The JUnit XML is CI's test report of it.
step "evaluation: deploy/evals/support.toml (JUnit: target/eval/support.junit.xml)"
bash scripts/eval.sh deploy/evals/support.toml

# Redis Cluster (docs/ARCHITECTURE.md): the end-to-end, fault and dead-letter suites again, against a
# local 3-master cluster on loopback ports 7101-7103 (scripts/redis-cluster.sh).
step "Redis Cluster: end-to-end, fault, paused-worker, retention and dead-letter suites against 3 masters"
cluster_url="$(bash scripts/redis-cluster.sh start)"
REDIS_URL="$cluster_url" cargo test -p agentfleet-tests --test e2e --test faults --test dlq --test paused_worker \
    --test retention --test resilience_primitives
bash scripts/redis-cluster.sh stop

step "container image: build from the test binaries, one session through containers"
bash scripts/container.sh

# The reduced chaos run (docs/RELIABILITY.md), on the debug binaries `cargo test` has just built: a
# release build would add minutes of compiling. It starts its own Redis and RabbitMQ node.
step "chaos suite, reduced"
bash scripts/chaos.sh --debug --sessions 100 --kills 5 --sigstop 1 --broker-restarts 1 --redis-restarts 1 --timeout-s 300

step "all checks passed"
