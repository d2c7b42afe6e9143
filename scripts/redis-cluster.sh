#!/usr/bin/env bash
# A local Redis Cluster for the tests: three masters, no replicas, on loopback ports, durable like the
# fleet needs (AOF on, maxmemory-policy noeviction), data under .run/redis-cluster/ of the repository.
#
#   bash scripts/redis-cluster.sh start   start it (or reuse a healthy one of ours); prints the URL
#   bash scripts/redis-cluster.sh stop    stop it and remove its data
#   bash scripts/redis-cluster.sh url     print the URL the fleet and the tests take as REDIS_URL
#
# `start` is idempotent: a healthy cluster of ours on the ports is reused; anything else of ours
# there (a node down, a cluster that did not form, a node of an older layout) is stopped, wiped and
# created anew. A Redis on one of the ports that is not ours (its `dir` is elsewhere) is left alone
# and `start` fails: set REDIS_CLUSTER_PORTS. Every wait is bounded (REDIS_CLUSTER_TIMEOUT_S).
#
# Env: REDIS_CLUSTER_PORTS (default "7101 7102 7103"), REDIS_CLUSTER_DIR (default .run/redis-cluster),
#      REDIS_CLUSTER_TIMEOUT_S (default 30)
#
# Use it as: REDIS_URL="$(bash scripts/redis-cluster.sh start)" cargo test -p agentfleet-tests --test e2e
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd -P)"
read -r -a PORTS <<<"${REDIS_CLUSTER_PORTS:-7101 7102 7103}"
DIR="${REDIS_CLUSTER_DIR:-$ROOT/.run/redis-cluster}"
TIMEOUT_S="${REDIS_CLUSTER_TIMEOUT_S:-30}"

say() { printf 'redis-cluster: %s\n' "$*" >&2; }
die() {
    printf 'redis-cluster: error: %s\n' "$*" >&2
    exit 1
}

# cli PORT ARGS...: redis-cli against one node, bounded.
cli() {
    local port="$1"
    shift
    timeout 5 redis-cli -h 127.0.0.1 -p "$port" "$@" 2>/dev/null
}

url() {
    local nodes=() port
    for port in "${PORTS[@]}"; do nodes+=("127.0.0.1:$port"); done
    local IFS=,
    printf 'redis+cluster://%s\n' "${nodes[*]}"
}

answers() { [[ "$(cli "$1" PING)" == PONG ]]; }

# ours PORT: the Redis on PORT keeps its data in our directory.
ours() { [[ "$(cli "$1" CONFIG GET dir | sed -n 2p)" == "$DIR/$1" ]]; }

# cluster_ok PORT: the node sees a whole, healthy cluster of our size.
cluster_ok() {
    local info
    info="$(cli "$1" CLUSTER INFO | tr -d '\r')" || return 1
    grep -qx 'cluster_state:ok' <<<"$info" &&
        grep -qx "cluster_known_nodes:${#PORTS[@]}" <<<"$info" &&
        grep -qx "cluster_size:${#PORTS[@]}" <<<"$info"
}

healthy() {
    local port
    for port in "${PORTS[@]}"; do
        answers "$port" && ours "$port" && cluster_ok "$port" || return 1
    done
}

# wait_until SECONDS COMMAND...: polls COMMAND every 0.2 s until it succeeds or SECONDS pass.
wait_until() {
    local deadline=$((SECONDS + $1))
    shift
    until "$@"; do
        ((SECONDS < deadline)) || return 1
        sleep 0.2
    done
}

stop_node() {
    local port="$1" pidfile="$DIR/$1/redis.pid"
    if answers "$port"; then
        ours "$port" || die "port $port has a Redis that is not this script's (its dir is elsewhere); set REDIS_CLUSTER_PORTS"
        cli "$port" SHUTDOWN NOSAVE >/dev/null || true
    elif [[ -f "$pidfile" ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
        # Started by us but not answering (hung or still loading): end that process only.
        kill "$(cat "$pidfile")" 2>/dev/null || true
    fi
    wait_until "$TIMEOUT_S" bash -c "! timeout 1 bash -c 'exec 3<>/dev/tcp/127.0.0.1/$port' 2>/dev/null" ||
        die "port $port is still taken after ${TIMEOUT_S}s (by something other than a Redis of this script?)"
}

stop() {
    local port
    for port in "${PORTS[@]}"; do stop_node "$port"; done
    rm -rf "$DIR"
}

start() {
    command -v redis-server >/dev/null && command -v redis-cli >/dev/null ||
        die "redis-server and redis-cli are needed (bash scripts/services.sh installs them)"
    if healthy; then
        say "reusing the healthy cluster on ports ${PORTS[*]}"
        url
        return
    fi
    say "starting a ${#PORTS[@]}-master cluster on ports ${PORTS[*]} (data in $DIR)"
    stop
    local port nodes=()
    for port in "${PORTS[@]}"; do
        mkdir -p "$DIR/$port"
        redis-server --port "$port" --bind 127.0.0.1 --daemonize yes \
            --cluster-enabled yes --cluster-config-file "$DIR/$port/nodes.conf" --cluster-node-timeout 5000 \
            --appendonly yes --appendfsync everysec --save "" --maxmemory-policy noeviction \
            --dir "$DIR/$port" --pidfile "$DIR/$port/redis.pid" --logfile "$DIR/$port/redis.log" ||
            die "redis-server on port $port did not start; see $DIR/$port/redis.log"
        nodes+=("127.0.0.1:$port")
    done
    for port in "${PORTS[@]}"; do
        wait_until "$TIMEOUT_S" answers "$port" || die "the node on port $port did not answer; see $DIR/$port/redis.log"
    done
    timeout "$TIMEOUT_S" redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$DIR/create.log" 2>&1 ||
        die "redis-cli --cluster create failed; see $DIR/create.log"
    for port in "${PORTS[@]}"; do
        wait_until "$TIMEOUT_S" cluster_ok "$port" || die "the cluster is not ok on port $port within ${TIMEOUT_S}s"
    done
    say "cluster ok"
    url
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    url) url ;;
    *) die "usage: $0 start|stop|url" ;;
esac
