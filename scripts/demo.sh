#!/usr/bin/env bash
# Runs a local fleet end to end: RabbitMQ + Redis, the tool server, the scripted model server (unless
# ANTHROPIC_API_KEY is set), a dispatcher and two workers, then `agentfleet-demo` against it.
#
# Usage: bash scripts/demo.sh [--keep]
#   --keep   leave the fleet running after the demo (until Ctrl-C) to poke at it with curl
# Env:
#   ANTHROPIC_API_KEY   set: use the real Anthropic API (costs money); unset: the scripted model
#   AGENTFLEET_CONFIG   config file (default deploy/local/agentfleet.toml)
#   DEMO_SESSIONS       sessions to submit (default 24)
#   DEMO_TIMEOUT_S      how long the demo waits for outcomes (default 120)
#   DISPATCHER_PORT     (default 8080)  MODEL_SERVER_PORT (default 8090)  TOOL_SERVER_PORT (default 8091)
#   OPS_PORT            the dispatcher's /healthz, /readyz, /metrics (default 9090)
#   AGENTFLEET_TOKEN    the API token the demo uses (default: a fresh random one, printed)
#   WORKERS             worker processes (default 2)
#   DEMO_PREFIX         the RabbitMQ name prefix of the demo's queues (default agentfleet-demo), unless
#                       the config sets `[amqp] prefix` itself
# Logs and pid files go to .run/.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

KEEP=0
for arg in "$@"; do
    case "$arg" in
        --keep) KEEP=1 ;;
        -h | --help)
            sed -n '2,14p' scripts/demo.sh | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "demo: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

CONFIG="${AGENTFLEET_CONFIG:-deploy/local/agentfleet.toml}"
DISPATCHER_PORT="${DISPATCHER_PORT:-8080}"
MODEL_SERVER_PORT="${MODEL_SERVER_PORT:-8090}"
TOOL_SERVER_PORT="${TOOL_SERVER_PORT:-8091}"
WORKERS="${WORKERS:-2}"
DEMO_SESSIONS="${DEMO_SESSIONS:-24}"
DEMO_TIMEOUT_S="${DEMO_TIMEOUT_S:-120}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-60}"
DEMO_PREFIX="${DEMO_PREFIX:-agentfleet-demo}"
RUN_DIR="$ROOT/.run"
BIN="${CARGO_TARGET_DIR:-$ROOT/target}/release"
DISPATCHER_URL="http://127.0.0.1:$DISPATCHER_PORT"
OPS_PORT="${OPS_PORT:-9090}"
OPS_URL="http://127.0.0.1:$OPS_PORT"
# The API wants a bearer token; the config stores only its SHA-256 (from this variable).
AGENTFLEET_TOKEN="${AGENTFLEET_TOKEN:-aft_$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')}"
export AGENTFLEET_TOKEN
TOKEN_SHA256="$(printf '%s' "$AGENTFLEET_TOKEN" | sha256sum | cut -d' ' -f1)"

say() { printf '\n==> %s\n' "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
    printf '\ndemo: error: %s\n' "$*" >&2
    exit 1
}

# --- process bookkeeping -----------------------------------------------------------------------

STARTED=() # "name:pid" of every process this run started, in start order

# is_ours PID: true when PID is alive and runs one of our binaries (guards against pid reuse).
is_ours() {
    kill -0 "$1" 2>/dev/null && grep -q 'agentfleet-' "/proc/$1/cmdline" 2>/dev/null
}

# stop_pids NAME:PID...: SIGTERM to each, then waits (workers drain in-flight steps), then SIGKILL.
stop_pids() {
    local entry pid
    for entry in "$@"; do
        pid="${entry##*:}"
        is_ours "$pid" && kill -TERM "$pid" 2>/dev/null || true
    done
    local deadline=$((SECONDS + 30))
    for entry in "$@"; do
        pid="${entry##*:}"
        while is_ours "$pid" && ((SECONDS < deadline)); do sleep 0.2; done
        if is_ours "$pid"; then
            info "${entry%%:*} (pid $pid) did not stop within 30 s; killing it"
            kill -KILL "$pid" 2>/dev/null || true
        fi
        rm -f "$RUN_DIR/${entry%%:*}.pid"
    done
}

# by_name PATTERN: the STARTED entries whose name matches PATTERN.
by_name() {
    local entry
    for entry in "${STARTED[@]}"; do
        # shellcheck disable=SC2053
        [[ "${entry%%:*}" == $1 ]] && printf '%s\n' "$entry"
    done
    return 0
}

# Stops what this run started: the dispatcher first (no new sessions), then the workers (they
# drain), then the model and tool servers the workers were still using.
CLEANED=0
cleanup() {
    ((CLEANED == 0)) || return 0
    CLEANED=1
    ((${#STARTED[@]} > 0)) || return 0
    say "stopping the fleet (SIGTERM, then waiting for the workers to drain)"
    local group entries
    for group in dispatcher 'worker-*' '*-server'; do
        mapfile -t entries < <(by_name "$group")
        ((${#entries[@]} == 0)) || stop_pids "${entries[@]}"
    done
    info "stopped; logs are in .run/"
}

on_signal() {
    trap - INT TERM
    printf '\ndemo: interrupted\n' >&2
    cleanup
    exit 130
}

trap cleanup EXIT
trap on_signal INT TERM

# Stops processes a previous run left behind, found through their pid files.
stop_leftovers() {
    local file name pid leftovers=()
    for file in "$RUN_DIR"/*.pid; do
        [[ -e "$file" ]] || continue
        name="$(basename "$file" .pid)"
        pid="$(cat "$file" 2>/dev/null || true)"
        if [[ "$pid" =~ ^[0-9]+$ ]] && is_ours "$pid"; then
            leftovers+=("$name:$pid")
        else
            rm -f "$file"
        fi
    done
    ((${#leftovers[@]} == 0)) && return 0
    say "stopping ${#leftovers[@]} process(es) left over from a previous run"
    stop_pids "${leftovers[@]}"
}

# --- probes ------------------------------------------------------------------------------------

port_in_use() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# http_status URL-PATH PORT: the HTTP status code of GET PATH on 127.0.0.1:PORT, or 000.
http_status() {
    timeout 3 bash -c '
        exec 3<>"/dev/tcp/127.0.0.1/$2" || exit 1
        printf "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n" "$1" >&3
        IFS=" " read -r _ code _ <&3 && printf "%s" "$code"
    ' _ "$1" "$2" 2>/dev/null || printf '000'
}

# --- starting processes ------------------------------------------------------------------------

# start NAME COMMAND...: starts COMMAND in the background, its output to .run/NAME.log.
start() {
    local name="$1"
    shift
    "$@" >"$RUN_DIR/$name.log" 2>&1 &
    local pid=$!
    echo "$pid" >"$RUN_DIR/$name.pid"
    STARTED+=("$name:$pid")
    info "started $name (pid $pid, log .run/$name.log)"
}

# pid_of NAME: the pid of a process this run started.
pid_of() {
    local entry
    entry="$(by_name "$1" | head -n 1)"
    printf '%s' "${entry##*:}"
}

# fail_with_log NAME MESSAGE: dies with MESSAGE and the end of NAME's log.
fail_with_log() {
    printf '\n--- last lines of .run/%s.log ---\n' "$1" >&2
    tail -n 20 "$RUN_DIR/$1.log" >&2 || true
    die "$2 (full log: .run/$1.log)"
}

# await_announce NAME: waits until a test server printed its `listening on` line.
await_announce() {
    local deadline=$((SECONDS + 15))
    until grep -q '^listening on ' "$RUN_DIR/$1.log" 2>/dev/null; do
        is_ours "$(pid_of "$1")" || fail_with_log "$1" "$1 exited during start-up"
        ((SECONDS < deadline)) || fail_with_log "$1" "$1 did not start listening within 15 s"
        sleep 0.2
    done
}

check_port_free() {
    port_in_use "$1" && die "port $1 ($2) is already in use by another process; stop it or set $3"
    return 0
}

# The config the fleet runs with: a copy of the chosen file in .run/, with the ports changed and the
# demo's own queue prefix (unless the file sets one). A prefix of its own keeps the demo's queues
# apart from a fleet's on the same broker, and from queues an earlier release declared with other
# arguments under the default prefix. With the scripted model server (no ANTHROPIC_API_KEY), the
# workers speak HTTP/2 to it without TLS (`http = "http2"`, unless the file sets `http`), as they
# do to the real API over TLS.
fleet_config() {
    local prefix=() http=()
    grep -q '^prefix *=' "$CONFIG" || prefix=(-e "/^\[amqp\]/a prefix = \"$DEMO_PREFIX\"")
    if [[ -z "${ANTHROPIC_API_KEY:-}" ]] && ! grep -q '^http *=' "$CONFIG"; then
        http=(-e '/^\[anthropic\]/a http = "http2"')
    fi
    sed -e "s#127\.0\.0\.1:8091/#127.0.0.1:$TOOL_SERVER_PORT/#g" \
        -e "s#^listen = \"[^\"]*\"#listen = \"127.0.0.1:$DISPATCHER_PORT\"#" \
        -e "s#^ops_listen = \"[^\"]*\"#ops_listen = \"127.0.0.1:$OPS_PORT\"#" \
        "${prefix[@]}" "${http[@]}" "$CONFIG" >"$RUN_DIR/agentfleet.toml"
    printf '%s' "$RUN_DIR/agentfleet.toml"
}

# Declares the fleet's queues before it starts. RabbitMQ cannot change a queue's arguments, so a
# queue an earlier release declared otherwise would stop the dispatcher and the workers at start;
# the demo deletes such a queue of its prefix when it is empty, and stops with the fix otherwise.
prepare_queues() {
    say "declaring the RabbitMQ queues of $1"
    env "${FLEET_ENV[@]}" AGENTFLEET_ADMIN_TOKEN_SHA256="$TOKEN_SHA256" \
        "$BIN/agentfleet-demo" --prepare-queues "$1" || die "the RabbitMQ queues could not be declared (see above)"
}

start_tool_server() {
    check_port_free "$TOOL_SERVER_PORT" "tool server" TOOL_SERVER_PORT
    start tool-server "$BIN/agentfleet-tool-server" --listen "127.0.0.1:$TOOL_SERVER_PORT"
    await_announce tool-server
}

# Chooses the model: the real API when ANTHROPIC_API_KEY is set, the scripted server otherwise.
# FLEET_ENV holds what only the dispatcher and the workers get.
FLEET_ENV=()
choose_model() {
    if [[ -n "${ANTHROPIC_API_KEY:-}" ]]; then
        say "model: the REAL Anthropic API (${ANTHROPIC_BASE_URL:-https://api.anthropic.com}); this spends tokens"
        return
    fi
    say "model: the SCRIPTED model server (ANTHROPIC_API_KEY is unset; no real API calls, no cost)"
    info "its answers are canned: goals that mention a human, a refund, a manager or an agent escalate"
    check_port_free "$MODEL_SERVER_PORT" "model server" MODEL_SERVER_PORT
    start model-server "$BIN/agentfleet-model-server" --listen "127.0.0.1:$MODEL_SERVER_PORT"
    await_announce model-server
    FLEET_ENV=(ANTHROPIC_BASE_URL="http://127.0.0.1:$MODEL_SERVER_PORT" ANTHROPIC_API_KEY=scripted-local)
}

start_fleet() {
    local config="$1" i
    say "starting the dispatcher and $WORKERS workers (config: $config)"
    check_port_free "$DISPATCHER_PORT" "dispatcher" DISPATCHER_PORT
    check_port_free "$OPS_PORT" "dispatcher ops" OPS_PORT
    FLEET_ENV+=(AGENTFLEET_ADMIN_TOKEN_SHA256="$TOKEN_SHA256")
    start dispatcher env "${FLEET_ENV[@]}" "$BIN/agentfleet-dispatcher" --config "$config"
    for ((i = 1; i <= WORKERS; i++)); do
        start "worker-$i" env "${FLEET_ENV[@]}" "$BIN/agentfleet-worker" --config "$config"
    done
}

await_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT_S)) status entry
    until [[ "$(http_status /readyz "$OPS_PORT")" == 200 ]]; do
        for entry in "${STARTED[@]}"; do
            is_ours "${entry##*:}" || fail_with_log "${entry%%:*}" "${entry%%:*} exited during start-up"
        done
        ((SECONDS < deadline)) ||
            fail_with_log dispatcher "the dispatcher was not ready ($OPS_URL/readyz) within ${READY_TIMEOUT_S} s"
        sleep 0.5
    done
    info "ready: $OPS_URL/readyz answers 200"
}

# Counts the error and warning lines in the fleet's JSON logs, so problems do not go unnoticed.
summarize_logs() {
    local file errors warnings
    say "fleet log summary"
    for file in "$RUN_DIR"/dispatcher.log "$RUN_DIR"/worker-*.log; do
        [[ -e "$file" ]] || continue
        errors="$(grep -c '"level":"ERROR"' "$file" || true)"
        warnings="$(grep -c '"level":"WARN"' "$file" || true)"
        info "$(printf '%-16s %4s errors %4s warnings' "$(basename "$file")" "$errors" "$warnings")"
    done
}

print_keep_help() {
    say "the fleet keeps running (--keep); press Ctrl-C to stop it"
    cat <<EOF
    export AGENTFLEET_TOKEN=$AGENTFLEET_TOKEN     # an admin token made for this run
    curl -s $OPS_URL/readyz
    curl -s -X POST $DISPATCHER_URL/v1/sessions -H "authorization: Bearer \$AGENTFLEET_TOKEN" \\
         -H 'content-type: application/json' \\
         -d '{"agent":"support","input":"My invoice looks wrong, I am ann@example.com"}'
    curl -s -H "authorization: Bearer \$AGENTFLEET_TOKEN" $DISPATCHER_URL/v1/sessions/<id>   # status, usage, messages
    curl -s $OPS_URL/metrics | grep ^agentfleet_
    tail -f .run/worker-1.log                          # JSON logs, one trace record per action
    # the operator console: $DISPATCHER_URL/console (sign in with the token above)
EOF
}

main() {
    say "services: RabbitMQ and Redis"
    bash scripts/services.sh

    say "building (cargo build --release --workspace)"
    cargo build --release --workspace || die "the build failed (see the compiler output above)"

    mkdir -p "$RUN_DIR"
    stop_leftovers
    [[ -r "$CONFIG" ]] || die "config file $CONFIG not found (set AGENTFLEET_CONFIG)"
    local config
    config="$(fleet_config)"

    say "starting the tool server on 127.0.0.1:$TOOL_SERVER_PORT"
    start_tool_server
    choose_model
    prepare_queues "$config"
    start_fleet "$config"
    await_ready

    say "running the demo: $DEMO_SESSIONS sessions"
    info "watch them in the console: $DISPATCHER_URL/console (sign in with the token $AGENTFLEET_TOKEN)"
    local rc=0
    "$BIN/agentfleet-demo" --url "$DISPATCHER_URL" --ops-url "$OPS_URL" --count "$DEMO_SESSIONS" --timeout-s "$DEMO_TIMEOUT_S" || rc=$?
    summarize_logs

    if ((KEEP)); then
        print_keep_help
        while true; do sleep 1; done
    fi
    cleanup
    exit "$rc"
}

main
