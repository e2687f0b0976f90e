#!/usr/bin/env bash
# Start a local bitcoind in regtest for l2d development (see regtest/README.md).
#
# Datadir: .regtest/bitcoind (kept between runs: the chain persists until `make clean`).
# Ports: free loopback ports chosen at each start, written to .regtest/env and to the datadir's
# bitcoin.conf, so `bitcoin-cli -datadir=.regtest/bitcoind <command>` works as is.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STATE="$ROOT/.regtest"
DATADIR="$STATE/bitcoind"
ENVFILE="$STATE/env"
PYTHON="${PYTHON:-python3}"
BITCOIND="${BITCOIND:-$(command -v bitcoind || true)}"
if [[ -z "$BITCOIND" || ! -x "$BITCOIND" ]]; then
    echo "bitcoind not found (set \$BITCOIND or put it on PATH)" >&2
    exit 1
fi
BITCOIN_CLI="${BITCOINCLI:-$(dirname "$BITCOIND")/bitcoin-cli}"
[[ -x "$BITCOIN_CLI" ]] || BITCOIN_CLI="$(command -v bitcoin-cli || true)"
if [[ -z "$BITCOIN_CLI" ]]; then
    echo "bitcoin-cli not found (set \$BITCOINCLI or put it on PATH)" >&2
    exit 1
fi

if [[ -f "$ENVFILE" ]]; then
    # shellcheck source=/dev/null
    source "$ENVFILE"
    if [[ -n "${BITCOIND_PID:-}" ]] && kill -0 "$BITCOIND_PID" 2>/dev/null; then
        echo "bitcoind is already running (pid $BITCOIND_PID, rpc $BITCOIN_RPC_URL); run regtest/stop.sh first" >&2
        exit 1
    fi
    rm -f "$ENVFILE"  # stale: the process is gone
fi

mkdir -p "$DATADIR"
# Three distinct free loopback ports (all held open while choosing): RPC, P2P, ZMQ.
read -r RPC_PORT P2P_PORT ZMQ_PORT < <("$PYTHON" -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks: s.close()')
ZMQ="tcp://127.0.0.1:$ZMQ_PORT"

# Same flags as regtest/harness.py (ISOLATION_FLAGS + NODE_FLAGS): keep them in step.
cat > "$DATADIR/bitcoin.conf" <<CONF
# written by regtest/start.sh; rewritten at every start
regtest=1
[regtest]
listen=0
dnsseed=0
fixedseeds=0
discover=0
listenonion=0
natpmp=0
connect=0
server=1
rpcbind=127.0.0.1
rpcallowip=127.0.0.1
fallbackfee=0.0002
txindex=1
printtoconsole=0
rpcport=$RPC_PORT
port=$P2P_PORT
zmqpubhashblock=$ZMQ
zmqpubrawblock=$ZMQ
zmqpubrawtx=$ZMQ
zmqpubsequence=$ZMQ
CONF

# -daemonwait: fork to the background and return once start-up has finished (or failed).
if ! "$BITCOIND" -datadir="$DATADIR" -daemonwait; then
    echo "bitcoind failed to start; last lines of $DATADIR/regtest/debug.log:" >&2
    tail -n 30 "$DATADIR/regtest/debug.log" >&2 || true
    exit 1
fi
# Readiness: wait for RPC (bitcoin-cli tolerates warm-up and connection refused while waiting).
"$BITCOIN_CLI" -datadir="$DATADIR" -rpcwait -rpcwaittimeout=60 getblockchaininfo > /dev/null
BITCOIND_PID="$(cat "$DATADIR/regtest/bitcoind.pid")"

cat > "$ENVFILE" <<ENV
# written by regtest/start.sh; source it: . .regtest/env
BITCOIND_PID=$BITCOIND_PID
BITCOIND_BIN=$BITCOIND
BITCOIN_CLI_BIN=$BITCOIN_CLI
BITCOIND_DATADIR=$DATADIR
BITCOIN_RPC_URL=http://127.0.0.1:$RPC_PORT
BITCOIN_RPC_PORT=$RPC_PORT
BITCOIN_RPC_COOKIE=$DATADIR/regtest/.cookie
BITCOIN_P2P_PORT=$P2P_PORT
BITCOIN_ZMQ=$ZMQ
ENV

echo "bitcoind regtest running: pid $BITCOIND_PID"
echo "  rpc    http://127.0.0.1:$RPC_PORT (cookie $DATADIR/regtest/.cookie)"
echo "  zmq    $ZMQ (hashblock rawblock rawtx sequence)"
echo "  cli    $BITCOIN_CLI -datadir=$DATADIR getblockchaininfo"
echo "  env    $ENVFILE"

# l2d against this node (skip with L2D_START=0): config/regtest.toml plus this bitcoind's RPC cookie
# and ZMQ endpoints, anchoring on, written to .regtest/l2d.toml.
if [[ "${L2D_START:-1}" == "1" ]]; then
    PY="$ROOT/.venv/bin/python"
    [[ -x "$PY" ]] || { echo "no $PY: run 'make test' or 'make run' once to create the venv" >&2; exit 1; }
    set -a; source "$ENVFILE"; set +a
    "$PY" "$ROOT/regtest/l2d_config.py" write "$ROOT/.regtest/l2d.toml"
    nohup "$PY" -m l2d.node --config "$ROOT/.regtest/l2d.toml" > "$ROOT/.regtest/l2d.log" 2>&1 &
    L2D_PID=$!
    echo "L2D_PID=$L2D_PID" >> "$ENVFILE"
    PORT="$("$PY" -c 'import sys, tomllib; print(tomllib.load(open(sys.argv[1], "rb"))["api"]["port"])' "$ROOT/.regtest/l2d.toml")"
    for _ in $(seq 1 300); do  # readiness: poll /health (30 s)
        if curl -fsS "http://127.0.0.1:$PORT/health" > /dev/null 2>&1; then break; fi
        if ! kill -0 "$L2D_PID" 2>/dev/null; then echo "l2d exited; see .regtest/l2d.log" >&2; tail -n 5 "$ROOT/.regtest/l2d.log" >&2; exit 1; fi
        sleep 0.1
    done
    echo "l2d running: pid $L2D_PID, REST http://127.0.0.1:$PORT, log .regtest/l2d.log, config .regtest/l2d.toml"
    echo "  next: regtest/fund.sh   (mines 101 blocks, funds the federation: its coins pay the anchors)"
fi
