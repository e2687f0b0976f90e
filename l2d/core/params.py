"""Network parameters as values: each network is one immutable object passed to whoever needs it."""
from __future__ import annotations

from dataclasses import dataclass

from .errors import WrongNetwork

MAX_MONEY = 21_000_000 * 100_000_000  # satoshis; no amount, balance or supply may exceed it


@dataclass(frozen=True, slots=True)
class Network:
    name: str
    id: int  # one byte, signed into every transaction and block
    admin_mint: bool  # may the mint authority create money (local/regtest only)

    def check(self, got_id: int, what: str) -> None:
        if got_id != self.id:
            raise WrongNetwork(f"{what} is for network id {got_id}, this is {self.name} (id {self.id})")


LOCAL = Network("local", 0x01, True)
REGTEST = Network("regtest", 0x02, True)
SIGNET = Network("signet", 0x03, False)
MAINNET = Network("mainnet", 0x04, False)

NETWORKS = {n.name: n for n in (LOCAL, REGTEST, SIGNET, MAINNET)}


def network_by_name(name: str) -> Network:
    try:
        return NETWORKS[name]
    except KeyError:
        raise WrongNetwork(f"unknown network {name!r}; known: {', '.join(NETWORKS)}") from None
