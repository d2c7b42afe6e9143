#!/usr/bin/env bash
# The chaos suite: builds `agentfleet-chaos` and the worker, then runs it. It starts its own Redis
# (AOF on) and its own RabbitMQ node on free ports, so its kills and restarts never touch the
# machine's shared services, runs a mix of sessions while it kills, pauses and restarts things, and
# prints one row per check. Exit status: 0 when nothing broke, 1 on a violation, 2 when it could
# not run. See docs/RELIABILITY.md.
#
# Usage: bash scripts/chaos.sh [--debug | --release | --profile NAME] [--no-build] [ARGS...]
#   --release       build and run the release binaries (default)
#   --debug         build and run the debug binaries (what `cargo test` builds; faster to build)
#   --profile NAME  build and run with cargo profile NAME
#   --no-build      run what is already built
#   ARGS            passed to agentfleet-chaos (try `--help`), e.g.
#                   --sessions 100 --kills 5 --sigstop 1 --broker-restarts 1 --redis-restarts 1
# Env: CARGO_TARGET_DIR (default target/)
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

PROFILE=release
BUILD=1
ARGS=()
while (($#)); do
    case "$1" in
        --release) PROFILE=release ;;
        --debug) PROFILE=dev ;;
        --profile)
            [[ $# -ge 2 ]] || { echo "chaos: --profile needs a name" >&2; exit 2; }
            PROFILE="$2"
            shift
            ;;
        --no-build) BUILD=0 ;;
        -h | --help)
            sed -n '2,16p' scripts/chaos.sh | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *) ARGS+=("$1") ;;
    esac
    shift
done

# Cargo names the folder of the `dev` profile `debug`; every other profile's folder is its name.
DIR="$PROFILE"
[[ "$PROFILE" == dev ]] && DIR=debug
BIN="${CARGO_TARGET_DIR:-target}/$DIR/agentfleet-chaos"

# The suite starts private copies of Redis and RabbitMQ, so it needs their programs, not the
# machine's running services (which may be busy or restarting): services.sh installs the programs
# when one is missing. With --shared-broker it uses the machine's broker, which services.sh starts.
SHARED=0
for arg in ${ARGS[@]+"${ARGS[@]}"}; do
    [[ "$arg" == --shared-broker ]] && SHARED=1
done
if [[ "$SHARED" -eq 1 ]] || ! command -v redis-server >/dev/null 2>&1 ||
    ! { command -v rabbitmq-server >/dev/null 2>&1 || [[ -x /usr/sbin/rabbitmq-server ]]; }; then
    bash scripts/services.sh
fi

if [[ "$BUILD" -eq 1 ]]; then
    cargo build --profile "$PROFILE" -p agentfleet-tests --bin agentfleet-chaos --bin agentfleet-test-worker
fi
[[ -x "$BIN" ]] || { echo "chaos: $BIN is missing; build it (drop --no-build)" >&2; exit 2; }

# exec: Ctrl-C and SIGTERM reach the suite itself, which stops everything it started.
exec "$BIN" ${ARGS[@]+"${ARGS[@]}"}
