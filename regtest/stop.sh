#!/usr/bin/env bash
# Stop the regtest bitcoind started by regtest/start.sh: RPC stop, wait for exit, kill if needed.
# The datadir (.regtest/bitcoind) is kept; `make clean` removes it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVFILE="$ROOT/.regtest/env"
TIMEOUT="${STOP_TIMEOUT:-60}"
if [[ ! -f "$ENVFILE" ]]; then
    echo "nothing to stop (no $ENVFILE)"
    exit 0
fi
# shellcheck source=/dev/null
source "$ENVFILE"

# l2d first (it talks to bitcoind): SIGTERM, wait for a clean exit, kill after the timeout.
if [[ -n "${L2D_PID:-}" ]] && kill -0 "$L2D_PID" 2>/dev/null; then
    kill -TERM "$L2D_PID"
    deadline=$((SECONDS + TIMEOUT))
    while kill -0 "$L2D_PID" 2>/dev/null; do
        if (( SECONDS >= deadline )); then kill -9 "$L2D_PID" 2>/dev/null || true; break; fi
        sleep 0.2  # poll interval while waiting for the process to exit
    done
    echo "l2d stopped"
fi

if ! kill -0 "$BITCOIND_PID" 2>/dev/null; then
    echo "bitcoind (pid $BITCOIND_PID) is not running"
    rm -f "$ENVFILE"
    exit 0
fi
"$BITCOIN_CLI_BIN" -datadir="$BITCOIND_DATADIR" stop > /dev/null || echo "RPC stop failed; waiting anyway" >&2
deadline=$((SECONDS + TIMEOUT))
while kill -0 "$BITCOIND_PID" 2>/dev/null; do
    if (( SECONDS >= deadline )); then
        echo "bitcoind (pid $BITCOIND_PID) still running after ${TIMEOUT}s; killing it" >&2
        kill -9 "$BITCOIND_PID" 2>/dev/null || true
        break
    fi
    sleep 0.2  # poll interval while waiting for the process to exit
done
rm -f "$ENVFILE"
echo "bitcoind stopped"
