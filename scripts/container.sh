#!/usr/bin/env bash
# The container smoke test: builds the fleet's image (deploy/Dockerfile, target runtime-prebuilt) from
# the debug binaries `cargo test` builds, runs the dispatcher and a worker from it as containers
# (read-only root filesystem, UID 65532, no capabilities, host network) against this machine's
# RabbitMQ and Redis, and checks that one session completes through them. The scripted model server
# and the tool server run on the host. Exits non-zero, with the containers' logs, on any failure;
# the containers and host processes it started are removed whatever happens. Needs root (or sudo),
# curl and python3; RabbitMQ and Redis are started with scripts/services.sh when they are not running.
#
# No container registry is needed: the runtime's base image is made here with debootstrap from the
# Debian mirror in /etc/apt/sources.list*, imported into podman once and reused (a first run takes
# about a minute longer). podman runs with deploy/containers/containers.conf (runc, cgroupfs).
#
# Usage: bash scripts/container.sh [--no-build]
#   --no-build   use the binaries in the target directory as they are (default: cargo build them,
#                which is quick after `cargo test`)
# Env:
#   CARGO_TARGET_DIR         where the debug binaries are (default target; they are in its debug/)
#   CONTAINER_IMAGE          the image to build and run (default localhost/agentfleet:ci)
#   CONTAINER_BASE_IMAGE     the runtime's base (default: the debootstrapped localhost/agentfleet-ci-base:SUITE)
#   DEBIAN_SUITE             the base's Debian release (default: this machine's, else bookworm); it
#                            must be this machine's or newer, as the binaries link against its glibc
#   DEBIAN_MIRROR            debootstrap's mirror (default: the first Debian one in /etc/apt/sources.list*)
#   CONTAINER_AMQP_PREFIX    the RabbitMQ name prefix (default agentfleet-container; runs on one machine
#                            take turns through a lock, as they share the queues)
#   SMOKE_TIMEOUT_S          how long the session may take (default 60)
#   READY_TIMEOUT_S          how long the dispatcher may take to be ready (default 30)
#   AMQP_URL, REDIS_URL      the broker and Redis (default: this machine's, as in scripts/services.sh)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"

BUILD=1
for arg in "$@"; do
    case "$arg" in
        --no-build) BUILD=0 ;;
        -h | --help)
            sed -n '2,28p' scripts/container.sh | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "container: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

BIN_DIR="${CARGO_TARGET_DIR:-$ROOT/target}/debug"
IMAGE="${CONTAINER_IMAGE:-localhost/agentfleet:ci}"
AMQP_PREFIX="${CONTAINER_AMQP_PREFIX:-agentfleet-container}"
SMOKE_TIMEOUT_S="${SMOKE_TIMEOUT_S:-60}"
READY_TIMEOUT_S="${READY_TIMEOUT_S:-30}"
export CONTAINERS_CONF="${CONTAINERS_CONF:-$ROOT/deploy/containers/containers.conf}"
# The five binaries the smoke test needs: three go into the image, two run on the host.
IMAGE_BINS=(agentfleet-dispatcher agentfleet-worker agentfleet)
HOST_BINS=(agentfleet-model-server agentfleet-tool-server)
# This run's name: the containers' names and the Redis key prefix.
RUN_ID="afctr-$(date +%s)-$$"
RUN_DIR="$ROOT/.run/$RUN_ID"
# The API wants a bearer token; the config stores only its SHA-256.
TOKEN="aft_$(od -An -tx1 -N24 /dev/urandom | tr -d ' \n')"
TOKEN_SHA256="$(printf '%s' "$TOKEN" | sha256sum | cut -d' ' -f1)"
# A goal the scripted model answers with a knowledge-base search, a customer lookup and an answer.
GOAL="Question about invoice INV-2291: why were we charged for 12 seats when we only have 9 users? My email is dana.reyes@northwind.example."

step() { printf '\n==> [%ss] %s\n' "$SECONDS" "$*"; }
info() { printf '    %s\n' "$*"; }
die() {
    printf '\ncontainer: error: %s\n' "$*" >&2
    exit 1
}

as_root() { if [[ "$(id -u)" -eq 0 ]]; then "$@"; else sudo "$@"; fi; }
pm() { as_root env CONTAINERS_CONF="$CONTAINERS_CONF" podman "$@"; }

# --- cleanup, whatever happens -------------------------------------------------------------------

CONTAINERS=()  # the containers this run started
HOST_PIDS=()   # the host processes this run started
FAILED=1       # cleared once the session completed and every check passed

print_logs() {
    local name
    for name in "${CONTAINERS[@]}"; do
        printf '\n--- podman logs %s (last 40 lines) ---\n' "$name" >&2
        pm logs --tail 40 "$name" >&2 2>&1 || true
    done
    for name in model-server tool-server; do
        [[ -s "$RUN_DIR/$name.log" ]] || continue
        printf '\n--- %s (host process, last 20 lines) ---\n' "$name" >&2
        tail -n 20 "$RUN_DIR/$name.log" >&2 || true
    done
}

delete_redis_keys() {
    command -v redis-cli >/dev/null || return 0
    local url="${REDIS_URL:-redis://127.0.0.1:6379}"
    redis-cli -u "$url" --scan --pattern "$RUN_ID:*" 2>/dev/null |
        xargs -r -n 500 redis-cli -u "$url" del >/dev/null 2>&1 || true
}

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    ((FAILED == 0)) || print_logs
    if ((${#CONTAINERS[@]} > 0)); then
        pm rm -f -t 10 "${CONTAINERS[@]}" >/dev/null 2>&1 || true
    fi
    local pid
    for pid in "${HOST_PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${HOST_PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    delete_redis_keys
    if ((FAILED == 0)); then
        rm -rf "$RUN_DIR"
        step "passed"
    else
        printf '\ncontainer: FAILED (logs and config kept in %s)\n' "${RUN_DIR#"$ROOT"/}" >&2
        ((rc != 0)) || rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- tools ---------------------------------------------------------------------------------------

apt_install() {
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@" >/dev/null 2>&1 ||
        (as_root env DEBIAN_FRONTEND=noninteractive apt-get update >/dev/null &&
            as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@")
}

ensure_tools() {
    step "podman, runc, debootstrap"
    local missing=()
    command -v podman >/dev/null || missing+=(podman)
    [[ -x /usr/sbin/runc ]] || command -v runc >/dev/null || missing+=(runc)
    [[ -x /usr/sbin/debootstrap ]] || command -v debootstrap >/dev/null || missing+=(debootstrap)
    if ((${#missing[@]} > 0)); then
        info "installing ${missing[*]}"
        apt_install "${missing[@]}" || die "apt-get install ${missing[*]} failed"
    fi
    info "$(pm --version), config $CONTAINERS_CONF"
}

# --- binaries ------------------------------------------------------------------------------------

ensure_binaries() {
    if ((BUILD)); then
        step "cargo build (debug: the image's three binaries and the two test servers)"
        cargo build -p agentfleet-dispatcher -p agentfleet-worker -p agentfleet-cli -p agentfleet-tests \
            --bin agentfleet-dispatcher --bin agentfleet-worker --bin agentfleet \
            --bin agentfleet-model-server --bin agentfleet-tool-server
    fi
    local bin
    for bin in "${IMAGE_BINS[@]}" "${HOST_BINS[@]}"; do
        [[ -x "$BIN_DIR/$bin" ]] || die "$BIN_DIR/$bin is missing; build it (drop --no-build, or set CARGO_TARGET_DIR)"
    done
}

# --- the base image ------------------------------------------------------------------------------

# The Debian release the binaries were built on: the base must have its glibc or a newer one.
debian_suite() {
    local codename=""
    if [[ -r /etc/os-release ]] && grep -q '^ID=debian' /etc/os-release; then
        codename="$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"')"
    fi
    printf '%s' "${DEBIAN_SUITE:-${codename:-bookworm}}"
}

# The first Debian archive (not the security one) this machine's apt uses.
debian_mirror() {
    if [[ -n "${DEBIAN_MIRROR:-}" ]]; then
        printf '%s' "$DEBIAN_MIRROR"
        return
    fi
    local url
    url="$(cat /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources 2>/dev/null |
        grep -v '^[[:space:]]*#' | grep -oE '(https?)://[^[:space:]]+/debian/?([[:space:]]|$)' | head -n 1 | tr -d '[:space:]')" || true
    printf '%s' "${url:-http://deb.debian.org/debian}"
}

ensure_base_image() {
    local suite base
    suite="$(debian_suite)"
    base="${CONTAINER_BASE_IMAGE:-localhost/agentfleet-ci-base:$suite}"
    BASE_IMAGE="$base"
    if pm image exists "$base"; then
        step "base image $base (cached)"
        return
    fi
    [[ -z "${CONTAINER_BASE_IMAGE:-}" ]] || die "the base image $base does not exist"
    local mirror dir
    mirror="$(debian_mirror)"
    step "base image $base: debootstrap --variant=minbase $suite from $mirror (once)"
    dir="$(mktemp -d "${TMPDIR:-/var/tmp}/agentfleet-base.XXXXXX")"
    if ! as_root debootstrap --variant=minbase --include=ca-certificates "$suite" "$dir/rootfs" "$mirror" \
        >"$dir/debootstrap.log" 2>&1; then
        tail -n 20 "$dir/debootstrap.log" >&2
        as_root rm -rf "$dir"
        die "debootstrap failed (set DEBIAN_MIRROR to another mirror?)"
    fi
    as_root rm -rf "$dir"/rootfs/var/cache/apt/archives/*.deb "$dir"/rootfs/var/lib/apt/lists/*
    as_root tar -C "$dir/rootfs" -c . |
        pm import --message "debootstrap --variant=minbase --include=ca-certificates $suite" - "$base" >/dev/null 2>&1
    as_root rm -rf "$dir"
    info "imported $base"
}

# --- the image -----------------------------------------------------------------------------------

# Builds the runtime-prebuilt target from a build context holding only the binaries (prebuilt/).
# Without layer caching: it takes seconds anyway, and podman 4.3 reuses a cached LABEL layer even
# when the build arguments in it changed (the image would carry an old revision).
build_image() {
    step "image $IMAGE (deploy/Dockerfile, target runtime-prebuilt, FROM $BASE_IMAGE)"
    local context="$RUN_DIR/context" bin old
    mkdir -p "$context/prebuilt"
    for bin in "${IMAGE_BINS[@]}"; do
        # The debug binaries without their debug sections: a fraction of the size, the same code.
        if command -v objcopy >/dev/null; then
            objcopy --strip-debug "$BIN_DIR/$bin" "$context/prebuilt/$bin"
        else
            cp "$BIN_DIR/$bin" "$context/prebuilt/$bin"
        fi
    done
    old="$(pm image inspect --format '{{.Id}}' "$IMAGE" 2>/dev/null || true)"
    pm build --layers=false --pull=never --network host --target runtime-prebuilt \
        --build-arg BASE_IMAGE="$BASE_IMAGE" \
        --build-arg REVISION="$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
        --build-arg CREATED="$(git log -1 --format=%cI 2>/dev/null || echo unknown)" \
        -f "$ROOT/deploy/Dockerfile" -t "$IMAGE" "$context" >"$RUN_DIR/build.log" 2>&1 || {
        tail -n 30 "$RUN_DIR/build.log" >&2
        die "podman build failed (log: ${RUN_DIR#"$ROOT"/}/build.log)"
    }
    rm -rf "$context"
    local new
    new="$(pm image inspect --format '{{.Id}}' "$IMAGE")"
    # The previous build of this tag, now untagged: removed so runs do not pile up images.
    [[ -z "$old" || "$old" == "$new" ]] || pm rmi "$old" >/dev/null 2>&1 || true
    info "built ${new:0:12}, $(pm image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%.0f MB", $1/1e6}')"
}

# The image itself: a non-root default user, and no shell to run.
check_image() {
    step "image checks"
    local user
    user="$(pm image inspect --format '{{.Config.User}}' "$IMAGE")"
    [[ "$user" == 65532:65532 ]] || die "the image's user is '$user', not 65532:65532"
    info "default user $user"
    pm run --rm --network none "$IMAGE" agentfleet-dispatcher --help >/dev/null ||
        die "the dispatcher in the image does not run"
    pm run --rm --network none "$IMAGE" agentfleet --help >/dev/null || die "the CLI in the image does not run"
    info "the binaries run (--help)"
    if pm run --rm --network none --entrypoint /bin/sh "$IMAGE" -c true >/dev/null 2>&1; then
        die "the image has a /bin/sh"
    fi
    info "no /bin/sh"
    local title
    title="$(pm image inspect --format '{{index .Labels "org.opencontainers.image.title"}}' "$IMAGE")"
    [[ "$title" == agentfleet ]] || die "label org.opencontainers.image.title is '$title'"
    info "OCI labels set (org.opencontainers.image.title=$title)"
}

# --- the host side -------------------------------------------------------------------------------

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# free_port: a TCP port nothing listens on (there is a small race until the dispatcher binds it).
free_port() {
    local port
    for _ in $(seq 50); do
        port=$((20000 + RANDOM % 30000))
        port_in_use "$port" || {
            printf '%s' "$port"
            return
        }
    done
    die "found no free port"
}

# start_server NAME: starts a test server on the host, on a port the system picks.
start_server() {
    "$BIN_DIR/agentfleet-$1" --listen 127.0.0.1:0 >"$RUN_DIR/$1.log" 2>&1 &
    HOST_PIDS+=("$!")
}

# server_port NAME PID: waits until the server announced its address; prints its port.
server_port() {
    local log="$RUN_DIR/$1.log" deadline=$((SECONDS + 15))
    until grep -qs '^listening on ' "$log"; do
        kill -0 "$2" 2>/dev/null || die "$1 exited during start-up"
        ((SECONDS < deadline)) || die "$1 did not listen within 15 s"
        sleep 0.1
    done
    sed -n 's/^listening on http:\/\/[^ ]*:\([0-9][0-9]*\).*/\1/p' "$log" | head -n 1
}

# The fleet's config: the example config with this run's ports and prefixes.
write_config() {
    local file="$RUN_DIR/agentfleet.toml"
    sed -e "s#127\.0\.0\.1:8091/#127.0.0.1:$TOOL_PORT/#g" \
        -e "s#^listen = \"[^\"]*\"#listen = \"127.0.0.1:$API_PORT\"#" \
        -e "s#^ops_listen = \"[^\"]*\"#ops_listen = \"127.0.0.1:$OPS_PORT\"#" \
        -e "/^\[amqp\]/a prefix = \"$AMQP_PREFIX\"" \
        -e "/^\[redis\]/a key_prefix = \"$RUN_ID\"" \
        deploy/local/agentfleet.toml >"$file"
    # Finished sessions of this run expire within the hour, should their keys outlive the cleanup.
    printf '\n[sessions]\nretention_ms = 3600000\n' >>"$file"
    chmod 644 "$file"
    printf '%s' "$file"
}

# --- the containers ------------------------------------------------------------------------------

# run_fleet_container NAME BINARY: the hardened way to run the image. Not even /tmp is writable
# (--read-only-tmpfs=false): the binaries write nowhere.
run_fleet_container() {
    local name="$RUN_ID-$1"
    local env=(-e "ANTHROPIC_BASE_URL=http://127.0.0.1:$MODEL_PORT" -e ANTHROPIC_API_KEY=scripted-local
        -e "AGENTFLEET_ADMIN_TOKEN_SHA256=$TOKEN_SHA256" -e "HOSTNAME=$name" -e RUST_LOG=info)
    [[ -z "${AMQP_URL:-}" ]] || env+=(-e "AMQP_URL=$AMQP_URL")
    [[ -z "${REDIS_URL:-}" ]] || env+=(-e "REDIS_URL=$REDIS_URL")
    CONTAINERS+=("$name")
    pm run -d --name "$name" --network host --read-only --read-only-tmpfs=false --user 65532:65532 --cap-drop=all \
        --security-opt no-new-privileges --pids-limit 256 \
        -v "$CONFIG:/etc/agentfleet/agentfleet.toml:ro" "${env[@]}" "$IMAGE" "${@:2}" >/dev/null ||
        die "podman run $name failed"
    info "started $name ($2)"
}

running() { [[ "$(pm inspect --format '{{.State.Running}}' "$1" 2>/dev/null)" == true ]]; }

# all_running: dies when a container of this run stopped.
all_running() {
    local name
    for name in "${CONTAINERS[@]}"; do
        running "$name" || die "container $name is not running (exit code $(pm inspect --format '{{.State.ExitCode}}' "$name" 2>/dev/null))"
    done
}

http_code() { curl -s -o /dev/null -w '%{http_code}' --max-time 3 "$1" || true; }

await_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    until [[ "$(http_code "http://127.0.0.1:$OPS_PORT/readyz")" == 200 ]]; do
        all_running
        ((SECONDS < deadline)) || die "the dispatcher was not ready within ${READY_TIMEOUT_S} s"
        sleep 0.3
    done
    info "dispatcher ready (/readyz 200)"
}

# await_consuming NAME PORT: waits until the worker container NAME is ready (it consumes its queues),
# asked with the image's own healthcheck command, `agentfleet probe`, run inside the container.
await_consuming() {
    local name="$RUN_ID-$1" deadline=$((SECONDS + READY_TIMEOUT_S))
    until pm exec "$name" agentfleet probe "http://127.0.0.1:$2/readyz" >/dev/null 2>&1; do
        all_running
        ((SECONDS < deadline)) || die "$name was not ready (consuming) within ${READY_TIMEOUT_S} s"
        sleep 0.3
    done
    info "$1 ready (consuming; its /readyz 200 through agentfleet probe)"
}

# The running containers: their processes are UID 65532 with no capabilities, on a read-only root.
check_containers() {
    step "container checks"
    all_running
    local name pid uid caps rootfs
    for name in "${CONTAINERS[@]}"; do
        [[ "$(pm inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$name")" == true ]] ||
            die "$name does not have a read-only root filesystem"
        pid="$(pm inspect --format '{{.State.Pid}}' "$name")"
        uid="$(awk '/^Uid:/ {print $2 "/" $3}' "/proc/$pid/status")"
        caps="$(awk '/^CapEff:/ {print $2}' "/proc/$pid/status")"
        rootfs="$(awk '$5 == "/" {print $6}' "/proc/$pid/mountinfo" | cut -d, -f1)"
        [[ "$uid" == 65532/65532 ]] || die "$name runs as UID $uid"
        [[ "$caps" =~ ^0+$ ]] || die "$name has capabilities $caps"
        [[ "$rootfs" == ro ]] || die "$name's root filesystem is mounted $rootfs"
        info "$name: pid $pid, uid $uid, CapEff $caps, / mounted $rootfs"
    done
}

api() {
    curl -sS --max-time 10 -H "authorization: Bearer $TOKEN" "$@"
}

json_get() { python3 -c 'import json,sys; v=json.load(sys.stdin).get(sys.argv[1]); print("" if v is None else v)' "$1"; }

# Submits the goal over the HTTP API and polls the session until it ends or the deadline passes.
run_session() {
    step "one session through the containers"
    local api_url="http://127.0.0.1:$API_PORT" created id status="" body
    created="$(api -X POST "$api_url/v1/sessions" -H 'content-type: application/json' \
        -d "{\"agent\":\"support\",\"input\":\"$GOAL\",\"idempotency_key\":\"$RUN_ID\"}")" ||
        die "POST /v1/sessions failed"
    id="$(json_get id <<<"$created")" || die "POST /v1/sessions answered: $created"
    [[ "$id" == s_* ]] || die "POST /v1/sessions answered: $created"
    info "submitted $id"
    local deadline=$((SECONDS + SMOKE_TIMEOUT_S))
    while :; do
        body="$(api "$api_url/v1/sessions/$id")" || body='{}'
        status="$(json_get status <<<"$body" 2>/dev/null)" || status=""
        case "$status" in
            completed | failed | budget_exhausted | cancelled | awaiting_human | awaiting_approval) break ;;
        esac
        all_running
        ((SECONDS < deadline)) || die "session $id is still '${status:-unknown}' after ${SMOKE_TIMEOUT_S} s"
        sleep 0.3
    done
    info "session $id ended: $status"
    # The outcome, as the image's own CLI prints it.
    pm run --rm --network host --read-only --cap-drop=all "$IMAGE" \
        agentfleet --url "$api_url" --token "$TOKEN" status "$id" | sed 's/^/    | /' ||
        die "the CLI in the image could not show the session"
    [[ "$status" == completed ]] || die "session $id ended '$status', not completed"
}

main() {
    mkdir -p "$RUN_DIR"
    step "services (RabbitMQ, Redis)"
    bash scripts/services.sh
    ensure_tools
    ensure_binaries
    ensure_base_image
    build_image
    check_image

    # The queues under AMQP_PREFIX are shared by the runs on this machine: one run at a time.
    exec 9>"${TMPDIR:-/tmp}/agentfleet-container-$AMQP_PREFIX.lock"
    flock -w 300 9 || die "another scripts/container.sh run held the lock for 5 minutes"

    step "host: scripted model server, tool server"
    start_server model-server
    MODEL_PORT="$(server_port model-server "${HOST_PIDS[-1]}")"
    start_server tool-server
    TOOL_PORT="$(server_port tool-server "${HOST_PIDS[-1]}")"
    info "model server on 127.0.0.1:$MODEL_PORT, tool server on 127.0.0.1:$TOOL_PORT"
    API_PORT="$(free_port)"
    OPS_PORT="$(free_port)"
    WORKER_OPS_PORT="$(free_port)"
    CONFIG="$(write_config)"

    step "containers: dispatcher and worker (AMQP prefix $AMQP_PREFIX, Redis prefix $RUN_ID)"
    run_fleet_container dispatcher agentfleet-dispatcher
    run_fleet_container worker-1 agentfleet-worker --metrics-listen "127.0.0.1:$WORKER_OPS_PORT"
    await_ready
    await_consuming worker-1 "$WORKER_OPS_PORT"
    check_containers
    run_session
    FAILED=0
}

main
