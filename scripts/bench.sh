#!/usr/bin/env bash
# Every figure of docs/BENCHMARKS.md, in one run on this machine, next to the reference.
#
# 1. Builds the release binaries and the two reference programs of ../shared/bench (steploop-proto,
#    the bare step protocol; amqpbench, the raw broker loop). Without ../shared/bench it says so and
#    skips every reference part.
# 2. Starts the scripted model server and tool server once; the reference and the fleet both run
#    against these same processes.
# 3. For ~3 KB and ~10 KB model requests (sessions of 1..9 and 1..39 steps): the reference, then
#    the fleet with the same sessions (`agentfleet-bench steps`): steps/s, CPU per step, Redis and
#    RabbitMQ per step, the mean request size, and the overhead per step at half that load.
# 4. RabbitMQ: amqpbench on a quorum and a classic queue, and the reference on a classic step queue.
# 5. Sessions in flight: 10,000 sessions against a 2 s model in one worker (`memory`).
# 6. Intake: sessions created per second over HTTP, by wrk (installed with apt-get when missing).
# 7. Prompt caching: dollars per session with prompt_cache "auto" and "off" on the same sessions
#    (`agentfleet-bench cache`; its table is printed and kept as cache.md).
# 8. The summary: a markdown table (printed; paste it into docs/BENCHMARKS.md) and JSON, in the
#    run's folder.
#
# RabbitMQ and Redis must run on their default local ports (scripts/services.sh makes sure of it).
# The bench reads their counters (Redis CONFIG RESETSTAT, then INFO; RabbitMQ through
# `rabbitmqctl eval`), so anything else using them at the same time shows up in the figures.
#
# Usage: bash scripts/bench.sh [--quick] [--parts LIST] [--out DIR] [--no-build]
#   --quick       short windows and fewer sessions (about 2 minutes instead of 5, after the build)
#   --parts LIST  comma-separated, of: steps,rabbitmq,memory,intake,cache (default: all)
#   --out DIR     where the results go (default: $CARGO_TARGET_DIR or target, then bench/<UTC time>)
#   --no-build    use the binaries already built
# Env:  MODEL_PORT (default 18290), TOOL_PORT (default 18291): the servers' ports
#       BENCH_REFERENCE_TARGET_DIR (default /tmp/bench-target): where the reference is built
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

QUICK=0
BUILD=1
PARTS="steps,rabbitmq,memory,intake,cache"
OUT=""
while [[ $# -gt 0 ]]; do
    case "$1" in
    --quick) QUICK=1 ;;
    --no-build) BUILD=0 ;;
    --parts)
        PARTS="${2:?--parts needs a list}"
        shift
        ;;
    --out)
        OUT="${2:?--out needs a folder}"
        shift
        ;;
    -h | --help)
        sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'
        exit 0
        ;;
    *)
        printf 'bench: unknown argument %s (see --help)\n' "$1" >&2
        exit 2
        ;;
    esac
    shift
done

TARGET_DIR="${CARGO_TARGET_DIR:-$ROOT/target}"
BIN="$TARGET_DIR/release"
BENCH="$BIN/agentfleet-bench"
SHARED_BENCH="$ROOT/../shared/bench"
REF_TARGET="${BENCH_REFERENCE_TARGET_DIR:-/tmp/bench-target}"
PROTO="$REF_TARGET/release/steploop-proto"
AMQPBENCH="$REF_TARGET/release/amqpbench"
MODEL_PORT="${MODEL_PORT:-18290}"
TOOL_PORT="${TOOL_PORT:-18291}"
MODEL_URL="http://127.0.0.1:$MODEL_PORT"
TOOL_URL="http://127.0.0.1:$TOOL_PORT"
RUN_DIR="${OUT:-$TARGET_DIR/bench/$(date -u +%Y%m%dT%H%M%SZ)}"
mkdir -p "$RUN_DIR"
RUN_DIR="$(cd "$RUN_DIR" && pwd)"

# The sizes of a run: windows, sessions, and how long a part may take at most.
if [[ $QUICK -eq 1 ]]; then
    WARMUP_S=2 WINDOW_S=6 HALF_LOAD_S=4 CENSUS=30 REF_SESSIONS=500
    AMQP_S=3 MEMORY_SESSIONS=2000 INTAKE_S=5 CACHE_SESSIONS=10
else
    WARMUP_S=5 WINDOW_S=15 HALF_LOAD_S=10 CENSUS=100 REF_SESSIONS=1000
    AMQP_S=10 MEMORY_SESSIONS=10000 INTAKE_S=10 CACHE_SESSIONS=40
fi
PART_TIMEOUT_S=600

say() { printf 'bench: %s\n' "$*"; }
warn() { printf 'bench: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'bench: error: %s\n' "$*" >&2
    exit 1
}
wants() { [[ ",$PARTS," == *",$1,"* ]]; }

FAILED=()
# part NAME COMMAND...: runs one part, bounded; a failure is noted and the run goes on.
part() {
    local name="$1"
    shift
    say "$name"
    if ! timeout --kill-after=10 "$PART_TIMEOUT_S" "$@" >"$RUN_DIR/$name.log" 2>&1; then
        warn "$name failed; its output: $RUN_DIR/$name.log"
        tail -n 20 "$RUN_DIR/$name.log" >&2 || true
        FAILED+=("$name")
    fi
}

# --- Servers, stopped on exit ---------------------------------------------------------------------

STARTED=()
cleanup() {
    local pid
    for pid in "${STARTED[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${STARTED[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start_server NAME PORT: starts BIN/NAME on PORT and waits (at most 20 s) for its "listening on".
start_server() {
    local name="$1" port="$2" log="$RUN_DIR/$1.log"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        die "port $port is taken: stop what listens there, or pick other ports with MODEL_PORT and TOOL_PORT"
    fi
    RUST_LOG=warn "$BIN/$name" --listen "127.0.0.1:$port" >"$log" 2>&1 &
    STARTED+=("$!")
    local i
    for ((i = 0; i < 200; i++)); do
        grep -q '^listening on' "$log" && return 0
        kill -0 "${STARTED[-1]}" 2>/dev/null || die "$name exited at start: $(tail -n 5 "$log")"
        sleep 0.1
    done
    die "$name did not start listening within 20 s (log: $log)"
}

# --- What the run needs ---------------------------------------------------------------------------

bash "$ROOT/scripts/services.sh"
command -v rabbitmqctl >/dev/null ||
    warn "rabbitmqctl is missing: RabbitMQ messages per step will read n/a"

REFERENCE=1
if [[ ! -d "$SHARED_BENCH/steploop-proto" || ! -d "$SHARED_BENCH/amqpbench" ]]; then
    warn "$SHARED_BENCH (the team folder's reference programs) is missing: the reference parts are skipped, so there are no ratios"
    REFERENCE=0
fi

if [[ $BUILD -eq 1 ]]; then
    say "building the release binaries"
    cargo build --release -p agentfleet-tests --bins
    if [[ $REFERENCE -eq 1 ]]; then
        say "building the reference programs into $REF_TARGET"
        for program in steploop-proto amqpbench; do
            cargo build --release --locked --manifest-path "$SHARED_BENCH/$program/Cargo.toml" --target-dir "$REF_TARGET"
        done
    fi
fi
for b in agentfleet-bench agentfleet-model-server agentfleet-tool-server agentfleet-test-worker; do
    [[ -x "$BIN/$b" ]] || die "$BIN/$b is missing: run without --no-build"
done
if [[ $REFERENCE -eq 1 && (! -x "$PROTO" || ! -x "$AMQPBENCH") ]]; then
    die "the reference programs are missing in $REF_TARGET/release: run without --no-build"
fi

if wants intake && ! command -v wrk >/dev/null; then
    say "installing wrk"
    if [[ "$(id -u)" -eq 0 ]]; then ROOT_CMD=(); else ROOT_CMD=(sudo); fi
    "${ROOT_CMD[@]}" apt-get install -y wrk >/dev/null 2>&1 ||
        { "${ROOT_CMD[@]}" apt-get update >/dev/null 2>&1 && "${ROOT_CMD[@]}" apt-get install -y wrk >/dev/null 2>&1; } ||
        warn "wrk could not be installed: the intake part is skipped"
fi

say "results in $RUN_DIR"
start_server agentfleet-model-server "$MODEL_PORT"
start_server agentfleet-tool-server "$TOOL_PORT"
SERVERS=(--model-url "$MODEL_URL" --tool-url "$TOOL_URL")

# --- The step path, against the reference -------------------------------------------------------

# reference LABEL EXTRA_ARGS...: steploop-proto as the README runs it, against our servers.
reference() {
    local label="$1"
    shift
    part "ref-$label" "$BENCH" reference --binary "$PROTO" "${SERVERS[@]}" --label "$label" \
        --out "$RUN_DIR/ref-$label.json" -- --sessions "$REF_SESSIONS" --raw --ledger-in-lua \
        --concurrency 256 --seconds "$WINDOW_S" --warmup "$WARMUP_S" "$@"
}

if wants steps; then
    for size in 3kb:5 10kb:20; do
        label="${size%%:*}" steps="${size##*:}"
        if [[ $REFERENCE -eq 1 ]]; then
            reference "$label" --steps "$steps" --vary
        fi
        part "steps-$label" "$BENCH" steps "${SERVERS[@]}" --label "$label" --steps "$steps" --vary \
            --live "$REF_SESSIONS" --concurrency 256 --warmup-s "$WARMUP_S" --seconds "$WINDOW_S" \
            --half-load-s "$HALF_LOAD_S" --census-sessions "$CENSUS" --out "$RUN_DIR/steps-$label.json"
    done
fi

# --- RabbitMQ: quorum vs classic -----------------------------------------------------------------

if wants rabbitmq && [[ $REFERENCE -eq 1 ]]; then
    for kind in quorum classic; do
        say "amqpbench $kind"
        if ! timeout --kill-after=10 120 "$AMQPBENCH" "$kind" 200 "$AMQP_S" >"$RUN_DIR/amqp-$kind.txt" 2>&1; then
            warn "amqpbench $kind failed: $(tail -n 5 "$RUN_DIR/amqp-$kind.txt")"
            FAILED+=("amqp-$kind")
        fi
    done
    reference 3kb-classic --steps 5 --vary --queue classic
fi

# --- Sessions in flight ---------------------------------------------------------------------------

if wants memory; then
    # Three steps a session with 8 KB of filler in the first message: model requests of about
    # 10 KB from the first step, without the minutes that 10,000 sessions of 20 steps would take.
    part memory "$BENCH" memory "${SERVERS[@]}" --sessions "$MEMORY_SESSIONS" \
        --concurrency "$MEMORY_SESSIONS" --model-latency-ms 2000 --steps 3 --pad-bytes 8000 \
        --out "$RUN_DIR/memory.json"
fi

# --- Intake ---------------------------------------------------------------------------------------

if wants intake && command -v wrk >/dev/null; then
    part intake "$BENCH" intake "${SERVERS[@]}" --seconds "$INTAKE_S" --connections 64 --threads 2 \
        --out "$RUN_DIR/intake.json"
fi

# --- Prompt caching -------------------------------------------------------------------------------

if wants cache; then
    # The same sessions with prompt_cache = "auto" and "off", each fleet with its own in-process
    # model server (its cache starts empty): dollars per session, with the demo's goals and with
    # [steps=12] sessions at ~3 KB and ~10 KB.
    part cache "$BENCH" cache --sessions "$CACHE_SESSIONS" --demo-sessions 24 --out "$RUN_DIR/cache.json"
    [[ -f "$RUN_DIR/cache.md" ]] && cat "$RUN_DIR/cache.md"
fi

# --- The summary ----------------------------------------------------------------------------------

"$BENCH" report "$RUN_DIR" --date "$(date -u '+%Y-%m-%d %H:%M UTC')"
say "summary: $RUN_DIR/summary.md and $RUN_DIR/summary.json"
if [[ ${#FAILED[@]} -gt 0 ]]; then
    die "parts that failed: ${FAILED[*]} (their logs are in $RUN_DIR)"
fi
