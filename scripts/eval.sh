#!/usr/bin/env bash
# Runs an evaluation suite through a fleet of its own: RabbitMQ + Redis (scripts/services.sh), the
# tool server and, unless ANTHROPIC_API_KEY is set, the scripted model server, then
# `agentfleet eval SUITE --config CONFIG`, which starts the real dispatcher and workers itself.
#
# Usage: bash scripts/eval.sh [SUITE] [-- EVAL ARGS...]
#   SUITE       default deploy/evals/support.toml (the example support agent's adversarial suite)
#   EVAL ARGS   passed to `agentfleet eval`, e.g. -- --record evals/recorded, -- --replay DIR,
#               -- --baseline target/eval/support.json, -- --filter refund
# Env:
#   AGENTFLEET_CONFIG   the agent config under test (default deploy/local/agentfleet.toml)
#   ANTHROPIC_API_KEY   set: the real Anthropic API grades the agent's decisions (costs money);
#                       unset: the scripted model server, which checks the fleet's guarantees
#   EVAL_OUT            where the reports go (default target/eval): <suite>.json, <suite>.junit.xml
#   EVAL_RELEASE=1      build and run release binaries (default: debug, as the tests build them)
#   EVAL_NO_BUILD=1     use the binaries already built
# The example config's tools live at http://127.0.0.1:8091; the script runs the tool server on a
# free port and evaluates a copy of the config that points there. Logs go to EVAL_OUT.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

SUITE="deploy/evals/support.toml"
if [[ $# -gt 0 && "$1" != "--" ]]; then
    SUITE="$1"
    shift
fi
if [[ $# -gt 0 && "$1" == "--" ]]; then
    shift
fi
case "$SUITE" in -h | --help)
    sed -n '2,18p' scripts/eval.sh | sed 's/^# \{0,1\}//'
    exit 0
    ;;
esac
[[ -f "$SUITE" ]] || {
    echo "eval: no suite file $SUITE" >&2
    exit 2
}
CONFIG="${AGENTFLEET_CONFIG:-deploy/local/agentfleet.toml}"
[[ -f "$CONFIG" ]] || {
    echo "eval: no config file $CONFIG" >&2
    exit 2
}
PROFILE=debug
[[ "${EVAL_RELEASE:-0}" == 1 ]] && PROFILE=release
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/$PROFILE"
OUT="${EVAL_OUT:-${CARGO_TARGET_DIR:-$ROOT/target}/eval}"
NAME="$(basename "$SUITE" .toml)"
mkdir -p "$OUT"

say() { printf '\n==> %s\n' "$*"; }

bash scripts/services.sh

if [[ "${EVAL_NO_BUILD:-0}" != 1 ]]; then
    say "cargo build ($PROFILE): the CLI, the dispatcher, the worker and the scripted servers"
    flags=()
    [[ "$PROFILE" == release ]] && flags=(--release)
    cargo build "${flags[@]}" -p agentfleet-cli -p agentfleet-dispatcher -p agentfleet-worker -p agentfleet-tests \
        --bin agentfleet --bin agentfleet-dispatcher --bin agentfleet-worker \
        --bin agentfleet-model-server --bin agentfleet-tool-server
fi

PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT

# start NAME BINARY VAR: runs BINARY --listen 127.0.0.1:0 and sets VAR to the URL it announces.
start() {
    local name="$1" binary="$2" var="$3" log="$OUT/$1.log" url="" i
    "$binary" --listen 127.0.0.1:0 >"$log" 2>&1 &
    PIDS+=("$!")
    for ((i = 0; i < 100; i++)); do
        url="$(grep -o 'http://127\.0\.0\.1:[0-9]*' "$log" | head -n1 || true)"
        [[ -n "$url" ]] && break
        kill -0 "${PIDS[-1]}" 2>/dev/null || break
        sleep 0.1
    done
    [[ -n "$url" ]] || {
        echo "eval: the $name did not start; its log ($log):" >&2
        cat "$log" >&2
        exit 1
    }
    printf -v "$var" '%s' "$url"
}

start tool-server "$BIN/agentfleet-tool-server" TOOLS_URL
EVAL_CONFIG="$OUT/$NAME.agentfleet.toml"
sed "s#http://127.0.0.1:8091#$TOOLS_URL#g" "$CONFIG" >"$EVAL_CONFIG"

if [[ -n "${ANTHROPIC_API_KEY:-}" ]]; then
    say "model: the REAL Anthropic API (${ANTHROPIC_BASE_URL:-https://api.anthropic.com}); this spends tokens"
else
    start model-server "$BIN/agentfleet-model-server" MODEL_URL
    export ANTHROPIC_BASE_URL="$MODEL_URL"
    say "model: the SCRIPTED model server at $MODEL_URL (no ANTHROPIC_API_KEY): the verdicts check the fleet, not a model"
fi

say "agentfleet eval $SUITE (config $CONFIG, tools at $TOOLS_URL)"
"$BIN/agentfleet" eval "$SUITE" --config "$EVAL_CONFIG" --bin-dir "$BIN" \
    --out "$OUT/$NAME.json" --junit "$OUT/$NAME.junit.xml" "$@"
say "reports: $OUT/$NAME.json, $OUT/$NAME.junit.xml"
