"""The Bitcoin chain paired with each L2 network: its SPV parameters and its address encodings.

The one place that pairs them; the config (bitcoind.chain), the bridge rules and the header store read it here.
"""
from __future__ import annotations

from dataclasses import dataclass

from .params import LOCAL, MAINNET, REGTEST, SIGNET, Network
from .spv import BITCOIN_MAINNET, BITCOIN_REGTEST, BITCOIN_SIGNET, ChainParams


@dataclass(frozen=True, slots=True)
class BtcChain:
    spv: ChainParams
    bitcoind_chain: str  # the chain name bitcoind reports in getblockchaininfo
    hrp: str
    p2pkh_version: int
    p2sh_version: int


BTC_REGTEST = BtcChain(BITCOIN_REGTEST, "regtest", "bcrt", 0x6F, 0xC4)
BTC_SIGNET = BtcChain(BITCOIN_SIGNET, "signet", "tb", 0x6F, 0xC4)
BTC_MAINNET = BtcChain(BITCOIN_MAINNET, "main", "bc", 0x00, 0x05)
BTC_CHAINS = (BTC_REGTEST, BTC_SIGNET, BTC_MAINNET)
_BTC_CHAIN = {LOCAL.id: BTC_REGTEST, REGTEST.id: BTC_REGTEST, SIGNET.id: BTC_SIGNET, MAINNET.id: BTC_MAINNET}


def btc_chain(network: Network) -> BtcChain:
    """The Bitcoin chain network anchors to and pegs against."""
    return _BTC_CHAIN[network.id]
