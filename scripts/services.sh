#!/usr/bin/env bash
# Makes sure Redis and RabbitMQ are installed and running on this machine.
#
# For each service: if it already answers, nothing is done (the whole script then takes well under a
# second). Otherwise it is installed with apt-get when its binary is missing, started without systemd
# (containers have none), and waited for. When REDIS_URL / AMQP_URL point at another host, that
# service is left alone: it is not ours to manage.
#
# A Redis this script starts is durable, as the fleet needs (README, "Production Redis"): AOF on
# (appendonly yes, appendfsync everysec), maxmemory-policy noeviction, data in $REDIS_DATA_DIR. A
# Redis that was running already is someone's own: when it lacks AOF or evicts, this script says
# so and how to fix it, and changes nothing (no CONFIG SET, no restart).
#
# Usage: bash scripts/services.sh
# Env:   REDIS_URL (default redis://127.0.0.1:6379)
#        AMQP_URL  (default amqp://guest:guest@127.0.0.1:5672/%2f)
#        REDIS_DATA_DIR (default .run/redis in the repository): the AOF of a Redis started here
#        RABBITMQ_START_TIMEOUT_S (default 90), REDIS_START_TIMEOUT_S (default 15)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

REDIS_URL="${REDIS_URL:-redis://127.0.0.1:6379}"
AMQP_URL="${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/%2f}"
RABBITMQ_START_TIMEOUT_S="${RABBITMQ_START_TIMEOUT_S:-90}"
REDIS_START_TIMEOUT_S="${REDIS_START_TIMEOUT_S:-15}"
REDIS_LOG="${TMPDIR:-/tmp}/agentfleet-redis.log"
REDIS_DATA_DIR="${REDIS_DATA_DIR:-$ROOT/.run/redis}"
RABBITMQ_LOG_DIR=/var/log/rabbitmq

say() { printf 'services: %s\n' "$*"; }
warn() { printf 'services: WARNING: %s\n' "$*" >&2; }
die() {
    printf 'services: error: %s\n' "$*" >&2
    exit 1
}

# need_root: dies with a clear message when root is needed and cannot be had.
need_root() {
    [[ "$(id -u)" -eq 0 ]] || command -v sudo >/dev/null 2>&1 ||
        die "$1 needs root, and sudo is missing; run this script as root"
}

# as_root COMMAND...: runs COMMAND as root, through sudo when we are not root.
ROOT_CMD=()
[[ "$(id -u)" -eq 0 ]] || ROOT_CMD=(sudo)
as_root() {
    "${ROOT_CMD[@]}" "$@"
}

# --- URLs --------------------------------------------------------------------------------------

# url_host URL: the host of URL (brackets of an IPv6 literal removed).
url_host() {
    local rest="${1#*://}"
    rest="${rest%%/*}"
    rest="${rest##*@}"
    if [[ "$rest" == \[* ]]; then
        rest="${rest#[}"
        printf '%s' "${rest%%]*}"
    else
        printf '%s' "${rest%%:*}"
    fi
}

# url_port URL DEFAULT: the port of URL, or DEFAULT when it has none.
url_port() {
    local rest="${1#*://}"
    rest="${rest%%/*}"
    rest="${rest##*@}"
    rest="${rest##*]}"
    if [[ "$rest" == *:* && -n "${rest##*:}" ]]; then
        printf '%s' "${rest##*:}"
    else
        printf '%s' "$2"
    fi
}

is_local_host() {
    case "$1" in
        "" | localhost | 127.* | ::1 | 0.0.0.0) return 0 ;;
        *) return 1 ;;
    esac
}

REDIS_HOST="$(url_host "$REDIS_URL")"
REDIS_PORT="$(url_port "$REDIS_URL" 6379)"
AMQP_HOST="$(url_host "$AMQP_URL")"
AMQP_PORT="$(url_port "$AMQP_URL" 5672)"

# --- probes (fast: plain bash sockets, no Erlang VM) -------------------------------------------

# redis_answers HOST PORT: true when a Redis server answers PING there (also when it wants AUTH).
redis_answers() {
    timeout 2 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "PING\r\n" >&3
        IFS= read -r -t 2 reply <&3 || exit 1
        [[ "$reply" == +PONG* || "$reply" == -NOAUTH* ]]
    ' _ "$1" "$2" 2>/dev/null
}

# redis_config HOST PORT NAME: the value of Redis setting NAME (CONFIG GET); fails when it cannot
# be read (CONFIG renamed or refused, AUTH needed).
redis_config() {
    timeout 2 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "CONFIG GET %s\r\n" "$3" >&3
        IFS= read -r -t 2 head <&3 || exit 1
        [[ "$head" == "*2"* ]] || exit 1
        for _ in 1 2 3; do IFS= read -r -t 2 _ <&3 || exit 1; done
        IFS= read -r -t 2 value <&3 || exit 1
        printf "%s" "${value%$'"'"'\r'"'"'}"
    ' _ "$1" "$2" "$3" 2>/dev/null
}

# amqp_answers HOST PORT: true when an AMQP 0-9-1 broker answers the protocol header with a
# frame (type 1, Connection.Start) there. An open port alone is not enough: a booting RabbitMQ
# is not ready for clients. A busy broker may take a few seconds to answer.
amqp_answers() {
    timeout 6 bash -c '
        exec 3<>"/dev/tcp/$1/$2" || exit 1
        printf "AMQP\x00\x00\x09\x01" >&3
        IFS= read -r -N 1 -t 5 frame_type <&3 || exit 1
        [[ "$frame_type" == $'"'"'\x01'"'"' ]]
    ' _ "$1" "$2" 2>/dev/null
}

# port_open HOST PORT: true when something accepts TCP connections there.
port_open() {
    timeout 2 bash -c 'exec 3<>"/dev/tcp/$1/$2"' _ "$1" "$2" 2>/dev/null
}

# wait_until SECONDS COMMAND...: runs COMMAND every half second until it succeeds or time is up.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.5
    done
}

# --- installation ------------------------------------------------------------------------------

APT_UPDATED=0

apt_install() {
    command -v apt-get >/dev/null 2>&1 ||
        die "$1 is not installed and apt-get is missing; install $1 yourself (this script knows Debian/Ubuntu)"
    need_root "installing $1"
    if [[ "$APT_UPDATED" -eq 0 ]]; then
        say "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq || die "apt-get update failed"
        APT_UPDATED=1
    fi
    say "installing $1 with apt-get (this can take a minute)"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$1" >/dev/null ||
        die "apt-get install -y $1 failed"
}

# rabbitmq_bin NAME: the path of a RabbitMQ tool (Debian puts them in /usr/sbin, which a normal
# user's PATH may lack).
rabbitmq_bin() {
    command -v "$1" 2>/dev/null || { [[ -x "/usr/sbin/$1" ]] && printf '/usr/sbin/%s' "$1"; } || true
}

# --- Redis -------------------------------------------------------------------------------------

start_redis() {
    command -v redis-server >/dev/null 2>&1 || apt_install redis-server
    # A package's post-install script may have started it already (Debian's has AOF off).
    if redis_answers 127.0.0.1 "$REDIS_PORT"; then
        say "Redis is up on 127.0.0.1:$REDIS_PORT"
        check_redis_durability
        return
    fi
    mkdir -p "$REDIS_DATA_DIR" || die "cannot create $REDIS_DATA_DIR for Redis's data"
    say "starting Redis on 127.0.0.1:$REDIS_PORT with AOF in $REDIS_DATA_DIR (log: $REDIS_LOG)"
    redis-server --daemonize yes --bind 127.0.0.1 --port "$REDIS_PORT" --save "" \
        --appendonly yes --appendfsync everysec --maxmemory-policy noeviction \
        --dir "$REDIS_DATA_DIR" --logfile "$REDIS_LOG" ||
        die "redis-server did not start; see $REDIS_LOG"
    wait_until "$REDIS_START_TIMEOUT_S" redis_answers 127.0.0.1 "$REDIS_PORT" ||
        die "Redis did not answer on 127.0.0.1:$REDIS_PORT within ${REDIS_START_TIMEOUT_S}s; see $REDIS_LOG"
    say "Redis is up on 127.0.0.1:$REDIS_PORT"
}

# check_redis_durability: warns when the Redis on 127.0.0.1:$REDIS_PORT could lose sessions (AOF
# off, or an evicting maxmemory-policy) or cannot be checked. It changes nothing: that Redis may
# be someone else's, shared, or deliberately ephemeral. The worker and the dispatcher warn too (or
# refuse, with redis.require_durable = true).
check_redis_durability() {
    local aof policy fix
    fix="for a Redis of your own: stop it and run this script again (it starts one with AOF), or"
    fix="$fix redis-cli -p $REDIS_PORT CONFIG SET <setting> <value> then CONFIG REWRITE"
    aof="$(redis_config 127.0.0.1 "$REDIS_PORT" appendonly)" || aof=""
    policy="$(redis_config 127.0.0.1 "$REDIS_PORT" maxmemory-policy)" || policy=""
    if [[ -z "$aof" || -z "$policy" ]]; then
        warn "could not read Redis's persistence settings (CONFIG GET refused, or AUTH needed);" \
            "the fleet needs appendonly yes and maxmemory-policy noeviction"
        return
    fi
    [[ "$aof" == yes ]] ||
        warn "Redis on 127.0.0.1:$REDIS_PORT runs with AOF off (appendonly $aof): a restart of it loses" \
            "every session. It was running already, so it is left as it is; $fix (appendonly yes)."
    [[ "$policy" == noeviction ]] ||
        warn "Redis on 127.0.0.1:$REDIS_PORT has maxmemory-policy $policy: when memory is full it drops" \
            "session keys and leases mid-step. It is left as it is; $fix (maxmemory-policy noeviction)."
}

ensure_redis() {
    if ! is_local_host "$REDIS_HOST"; then
        say "Redis: REDIS_URL points at $REDIS_HOST:$REDIS_PORT, not this machine; leaving it alone"
        return
    fi
    if redis_answers 127.0.0.1 "$REDIS_PORT"; then
        say "Redis is up on 127.0.0.1:$REDIS_PORT"
        check_redis_durability
        return
    fi
    start_redis
}

# --- RabbitMQ ----------------------------------------------------------------------------------

rabbitmqctl_() {
    local ctl
    ctl="$(rabbitmq_bin rabbitmqctl)"
    [[ -n "$ctl" ]] || return 1
    as_root "$ctl" "$@"
}

# The broker application's state, asked of the node itself (slow: it boots an Erlang VM):
# `running`, `booting`, `stopped` (the node runs, the application does not) or `down` (no node).
rabbitmq_state() {
    local diag
    diag="$(rabbitmq_bin rabbitmq-diagnostics)"
    [[ -n "$diag" ]] || { echo down && return; }
    ask() { timeout 60 "${ROOT_CMD[@]}" "$diag" -q --timeout 30 "$@" 2>/dev/null; }
    if ask check_running >/dev/null; then
        echo running
    elif ! ask ping >/dev/null; then
        echo down
    elif ask is_booting | grep -q 'is booting'; then
        echo booting
    else
        echo stopped
    fi
}

# start_rabbitmq_node: starts the node in the background, with the open-files limit its packaged
# service unit sets (65536). The `su` of Debian's wrapper would leave 1024, with which RabbitMQ's
# file handle cache runs out once a few hundred quorum queues exist, and then it stops accepting
# connections.
start_rabbitmq_node() {
    local server=/usr/lib/rabbitmq/bin/rabbitmq-server
    if [[ -x "$server" ]] && id rabbitmq >/dev/null 2>&1; then
        as_root su rabbitmq -s /bin/sh -c \
            "ulimit -n 65536 2>/dev/null || ulimit -n \$(ulimit -Hn); cd /var/lib/rabbitmq && exec $server -detached"
    else
        as_root "$(rabbitmq_bin rabbitmq-server)" -detached
    fi
}

# await_rabbitmq: waits until the broker answers AMQP and has finished booting.
await_rabbitmq() {
    wait_until "$RABBITMQ_START_TIMEOUT_S" amqp_answers 127.0.0.1 "$AMQP_PORT" ||
        die "RabbitMQ did not answer AMQP on 127.0.0.1:$AMQP_PORT within ${RABBITMQ_START_TIMEOUT_S}s; see $RABBITMQ_LOG_DIR/ (if the node is stuck: rabbitmqctl stop, then run this script again)"
    rabbitmqctl_ -q --timeout 60 await_startup >/dev/null ||
        die "RabbitMQ answers on port $AMQP_PORT but did not finish booting; see $RABBITMQ_LOG_DIR/"
    say "RabbitMQ is up on 127.0.0.1:$AMQP_PORT"
}

start_rabbitmq() {
    [[ -n "$(rabbitmq_bin rabbitmq-server)" ]] || apt_install rabbitmq-server
    need_root "managing RabbitMQ"
    case "$(rabbitmq_state)" in
        running | booting)
            # It runs, or boots: leave it alone and wait for it.
            say "RabbitMQ is starting or busy; waiting for it"
            ;;
        stopped)
            # The node runs without its application (`rabbitmqctl stop_app`). Someone may be restarting
            # it: give them time before starting it ourselves.
            say "RabbitMQ's application is stopped; waiting up to 30s for it to come back"
            if ! wait_until 30 amqp_answers 127.0.0.1 "$AMQP_PORT"; then
                say "starting RabbitMQ's application"
                rabbitmqctl_ -q start_app >/dev/null || die "rabbitmqctl start_app failed; see $RABBITMQ_LOG_DIR/"
            fi
            ;;
        down)
            port_open 127.0.0.1 "$AMQP_PORT" &&
                die "port $AMQP_PORT is taken by something that is not a RabbitMQ node this script can manage"
            say "starting RabbitMQ (takes up to ${RABBITMQ_START_TIMEOUT_S}s; logs: $RABBITMQ_LOG_DIR/)"
            start_rabbitmq_node || die "rabbitmq-server -detached failed; see $RABBITMQ_LOG_DIR/"
            ;;
    esac
    await_rabbitmq
}

ensure_rabbitmq() {
    if ! is_local_host "$AMQP_HOST"; then
        say "RabbitMQ: AMQP_URL points at $AMQP_HOST:$AMQP_PORT, not this machine; leaving it alone"
        return
    fi
    if amqp_answers 127.0.0.1 "$AMQP_PORT"; then
        say "RabbitMQ is up on 127.0.0.1:$AMQP_PORT"
        return
    fi
    start_rabbitmq
}

ensure_redis
ensure_rabbitmq
