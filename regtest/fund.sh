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
# The wallet is the regtest miner and funding source; the federation's anchor key (created by l2d)
# receives FUND_BTC below. The m-of-n peg keys arrive with the peg-in/peg-out work.
ADDRESS="$(cli -rpcwallet="$WALLET" getnewaddress mining bech32m)"
cli generatetoaddress "$BLOCKS" "$ADDRESS" > /dev/null
echo "mined $BLOCKS blocks to $ADDRESS; height $(cli getblockcount)"
echo "balance of $WALLET: $(cli -rpcwallet="$WALLET" getbalance) BTC"
if [[ -f "$ROOT/.regtest/l2d.toml" ]]; then
    FED_ADDRESS="$("$ROOT/.venv/bin/python" "$ROOT/regtest/l2d_config.py" address "$ROOT/.regtest/l2d.toml")"
    TXID="$(cli -rpcwallet="$WALLET" sendtoaddress "$FED_ADDRESS" "${FUND_BTC:-10}")"
    cli generatetoaddress 1 "$ADDRESS" > /dev/null
    echo "sent ${FUND_BTC:-10} BTC to the federation's anchor key $FED_ADDRESS (txid $TXID), mined 1 block"
fi
