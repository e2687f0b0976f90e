#!/usr/bin/env bash
# Create (or load) the federation's wallet in the running regtest bitcoind, mine blocks to it,
# and print its balance. Usage: regtest/fund.sh [blocks]   (default 101: one coinbase matures)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ENVFILE="$ROOT/.regtest/env"
WALLET="${WALLET:-federation}"
BLOCKS="${1:-101}"
if [[ ! -f "$ENVFILE" ]]; then
    echo "no $ENVFILE: start bitcoind with regtest/start.sh first" >&2
    exit 1
fi
# shellcheck source=/dev/null
source "$ENVFILE"
cli() { "$BITCOIN_CLI_BIN" -datadir="$BITCOIND_DATADIR" "$@"; }

if cli listwallets | grep -q "\"$WALLET\""; then
    echo "wallet $WALLET already loaded"
elif [[ -d "$BITCOIND_DATADIR/regtest/wallets/$WALLET" ]]; then
    cli loadwallet "$WALLET" > /dev/null
    echo "wallet $WALLET loaded"
else
    cli -named createwallet wallet_name="$WALLET" load_on_startup=false > /dev/null
    echo "wallet $WALLET created"
fi
# The wallet is the regtest miner and the operator's funding source: FUND_SAT (default 10,000,000) of it go to the
# federation's funding address and are recorded in l2d with their SPV proof (what `l2-cli federation-fund` does);
# the federation's anchors are paid from that coin.
ADDRESS="$(cli -rpcwallet="$WALLET" getnewaddress mining bech32m)"
cli generatetoaddress "$BLOCKS" "$ADDRESS" > /dev/null
echo "mined $BLOCKS blocks to $ADDRESS; height $(cli getblockcount)"
echo "balance of $WALLET: $(cli -rpcwallet="$WALLET" getbalance) BTC"
if [[ -f "$ROOT/.regtest/l2d.toml" ]]; then
    "$ROOT/.venv/bin/python" "$ROOT/regtest/l2d_config.py" fund "$ROOT/.regtest/l2d.toml" "${FUND_SAT:-10000000}" "$WALLET"
fi
