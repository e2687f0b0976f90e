"""The deposit script against a real bitcoind: with an emergency path it is exactly the miniscript
or_i(multi(m,K'..),and_v(v:older(d),multi(e,E..))) that bitcoind derives from descriptor_of (every encoding of the
delay), and the emergency keys can spend a federation coin only once it is d blocks old (BIP68); the federation's
own path (the plans) is spent in the bridge's regtest tests, whose federation has an emergency path."""
from __future__ import annotations

import hashlib

import pytest
from bitcoin.core import CMutableTransaction, COutPoint, CTransaction, CTxIn, CTxInWitness, CTxOut, CTxWitness
from bitcoin.core.script import SIGHASH_ALL, SIGVERSION_WITNESS_V0, CScript, CScriptWitness, SignatureHash
from coincurve import PrivateKey

from bridge.rpc import BitcoinRPC
from l2d.core.params import REGTEST
from l2d.core.pegs import (Federation, address_script, deposit_script_pubkey, descriptor_of, script_address,
                           witness_script)
from regtest.harness import BitcoindNode, fund_wallet

pytestmark = pytest.mark.regtest


def secret(tag: str) -> bytes:
    return hashlib.sha256(b"l2d emergency test " + tag.encode()).digest()


FED_SECRETS = [secret(f"fed {i}") for i in range(3)]
EMERGENCY = [secret(f"emergency {i}") for i in range(3)]
CONTRACT = hashlib.sha256(b"an account").digest()


def federation(delay: int) -> Federation:
    return Federation(2, tuple(sorted(PrivateKey(s).public_key.format() for s in FED_SECRETS)), 6, 2,
                      tuple(sorted(PrivateKey(s).public_key.format() for s in EMERGENCY)), delay)


async def test_the_deposit_script_is_the_miniscript_bitcoind_derives(bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    plain = Federation(2, federation(1).keys, 6)
    for fed in [plain] + [federation(d) for d in (1, 16, 17, 127, 128, 255, 256, 4032, 32767, 32768, 65535)]:
        desc = (await rpc.call("getdescriptorinfo", [descriptor_of(fed, REGTEST.id, CONTRACT)]))["descriptor"]
        [address] = await rpc.call("deriveaddresses", [desc])
        assert address == script_address(deposit_script_pubkey(fed, REGTEST.id, CONTRACT), REGTEST), fed
    assert witness_script(plain, REGTEST.id, CONTRACT)[-1] == 0xAE  # no emergency path: the plain multisig


async def test_the_emergency_keys_spend_a_coin_only_once_it_is_old_enough(bitcoind: BitcoindNode,
                                                                          rpc: BitcoinRPC) -> None:
    delay = 10
    fed = federation(delay)
    ws = witness_script(fed, REGTEST.id, CONTRACT)
    spk = deposit_script_pubkey(fed, REGTEST.id, CONTRACT)
    w, mine = await fund_wallet(rpc, "emergency", blocks=101)
    txid = await w.sendtoaddress(script_address(spk, REGTEST), 1_000_000)
    [vout] = [n for n, o in enumerate(CTransaction.deserialize(await rpc.getrawtransaction(txid)).vout)
              if bytes(o.scriptPubKey) == spk]
    await rpc.generatetoaddress(1, mine)
    dest = address_script(await w.getnewaddress(), REGTEST)

    def spend(sequence: int, signers: list[bytes]) -> bytes:
        tx = CMutableTransaction([CTxIn(COutPoint(txid, vout), nSequence=sequence)], [CTxOut(990_000, CScript(dest))],
                                 nVersion=2)
        digest = SignatureHash(CScript(ws), tx, 0, SIGHASH_ALL, amount=1_000_000, sigversion=SIGVERSION_WITNESS_V0)
        by_key = {PrivateKey(s).public_key.format(): PrivateKey(s).sign(digest, hasher=None) + b"\x01"
                  for s in signers}
        order = ([k for k in fed.emergency_keys if k in by_key]
                 + sorted(k for k in by_key if k not in fed.emergency_keys))
        sigs = [by_key[k] for k in order]  # the script's key order
        tx.wit = CTxWitness([CTxInWitness(CScriptWitness([b""] + sigs + [b"", ws]))])  # OP_IF false: the 2nd path
        return bytes(tx.serialize())

    async def refused(raw: bytes) -> str:
        [r] = await rpc.testmempoolaccept([raw])
        assert not r.allowed
        return str(r.reject_reason)

    two = EMERGENCY[:2]
    assert await refused(spend(delay, two)) == "non-BIP68-final"  # 1 confirmation of 10
    await rpc.generatetoaddress(delay - 2, mine)
    assert await refused(spend(delay, two)) == "non-BIP68-final"  # 9 of 10
    await rpc.generatetoaddress(1, mine)  # 10: old enough
    assert "Locktime requirement not satisfied" in await refused(spend(delay - 1, two))  # CSV wants nSequence >= 10
    assert "stack size" in await refused(spend(delay, EMERGENCY[:1]))  # 1 signature of the 2 the path needs
    assert "failed CHECK(MULTI)SIG" in await refused(spend(delay, FED_SECRETS[:2]))  # federation keys: not here
    raw = spend(delay, [EMERGENCY[2], EMERGENCY[0]])
    [ok] = await rpc.testmempoolaccept([raw])
    assert ok.allowed, ok.reject_reason
    spent = await rpc.sendrawtransaction(raw)
    await rpc.generatetoaddress(1, mine)
    assert (await rpc.call("getrawtransaction", [spent[::-1].hex(), True]))["confirmations"] == 1
    assert await rpc.call("gettxout", [txid[::-1].hex(), vout]) is None
