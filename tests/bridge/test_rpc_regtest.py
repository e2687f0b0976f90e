"""BitcoinRPC against a real bitcoind in regtest: typed results, byte order, sats."""
from __future__ import annotations

import hashlib

import pytest
from bitcoin.core import CBlock, CBlockHeader, CTransaction
from coincurve import PrivateKey

from bridge.rpc import BitcoinRPC, hash_to_hex
from bridge.rpc_errors import (RPCAlreadyInChain, RPCInvalidAddressOrKey, RPCInvalidParameter, RPCMethodNotFound,
                               RPCWalletNotFound)
from regtest.harness import BitcoindNode, fund_wallet

pytestmark = pytest.mark.regtest

COINBASE_SAT = 50 * 100_000_000


def sha256d(b: bytes) -> bytes:
    return hashlib.sha256(hashlib.sha256(b).digest()).digest()


async def test_chain_info_is_fresh_regtest(rpc: BitcoinRPC) -> None:
    info = await rpc.getblockchaininfo()
    assert info.chain == "regtest"
    assert info.blocks == 0
    genesis = await rpc.getblockhash(0)
    assert info.best_block_hash == genesis
    # The regtest genesis hash, as displayed everywhere (display order), and its header hashes to it.
    assert info.best_block_hash_hex == "0f9188f13cb7b2c71f2a335e3a4fc328bf5beb436012afca590b1a11466e2206"
    header = await rpc.getblockheader(genesis)
    assert len(header) == 80 and sha256d(header) == genesis
    assert (await rpc.require_chain("regtest")).blocks == 0
    with pytest.raises(RPCInvalidParameter):
        await rpc.getblockhash(1)
    with pytest.raises(RPCMethodNotFound):
        await rpc.call("nosuchmethod")


async def test_mine_send_and_fetch(rpc: BitcoinRPC) -> None:
    wallet, address = await fund_wallet(rpc, "federation", 101)
    assert await rpc.getblockcount() == 101
    balance = await wallet.getbalance()
    assert isinstance(balance, int) and balance == COINBASE_SAT  # only the first coinbase is mature

    amount = 12_345_678
    txid = await wallet.sendtoaddress(await wallet.getnewaddress(), amount)
    assert isinstance(txid, bytes) and len(txid) == 32
    assert await rpc.getrawmempool() == [txid]
    entry = await rpc.getmempoolentry(txid)
    assert entry.txid == txid and isinstance(entry.fee_sat, int) and entry.fee_sat > 0

    raw = await rpc.getrawtransaction(txid)
    tx = CTransaction.deserialize(raw)
    assert bytes(tx.GetTxid()) == txid  # internal byte order on both sides
    assert tx.serialize() == raw
    assert amount in [out.nValue for out in tx.vout]  # nValue is sats

    (block_hash,) = await rpc.generatetoaddress(1, address)
    assert await rpc.getbestblockhash() == block_hash
    raw_block = await rpc.getblock(block_hash)
    block = CBlock.deserialize(raw_block)
    assert bytes(block.GetHash()) == block_hash
    assert txid in [bytes(t.GetTxid()) for t in block.vtx]
    # With -txindex the confirmed transaction is still found without its block hash.
    assert await rpc.getrawtransaction(txid) == raw
    assert await rpc.getrawtransaction(txid, block_hash) == raw

    # gettxoutproof: a CMerkleBlock whose first 80 bytes are the block header.
    proof = await rpc.gettxoutproof([txid], block_hash)
    header = await rpc.getblockheader(block_hash)
    assert proof[:80] == header
    assert bytes(CBlockHeader.deserialize(proof[:80]).GetHash()) == block_hash
    assert await rpc.verifytxoutproof(proof) == [txid]

    info = await rpc.getblockheader(block_hash, verbose=True)
    assert info.height == 102 and info.confirmations == 1 and info.n_tx == 2
    assert info.prev_block_hash == await rpc.getblockhash(101)

    utxos = await wallet.listunspent()
    assert utxos and all(isinstance(u.amount_sat, int) and u.amount_sat > 0 for u in utxos)
    mine = [u for u in utxos if u.txid == txid and u.amount_sat == amount]
    assert len(mine) == 1
    assert mine[0].script_pubkey == tx.vout[mine[0].vout].scriptPubKey
    assert mine[0].confirmations == 1
    assert await rpc.getrawmempool() == []


async def test_testmempoolaccept_and_send_wallet_signed_tx(rpc: BitcoinRPC) -> None:
    wallet, address = await fund_wallet(rpc, "federation", 101)
    unsigned = await rpc.createrawtransaction({await wallet.getnewaddress(): 100_000_000}, data=b"l2d")
    funded = await wallet.fundrawtransaction(unsigned)
    assert funded.fee_sat > 0
    signed = await wallet.signrawtransactionwithwallet(funded.raw)
    assert signed.complete and signed.errors == ()

    (result,) = await rpc.testmempoolaccept([signed.raw])
    tx = CTransaction.deserialize(signed.raw)
    assert result.allowed, result.reject_reason
    assert result.txid == bytes(tx.GetTxid())
    assert result.fee_sat == funded.fee_sat
    assert result.vsize is not None and result.vsize > 0
    assert result.effective_feerate_sat_per_kvb is not None and result.effective_feerate_sat_per_kvb > 0
    assert await rpc.getrawmempool() == []  # testmempoolaccept does not submit

    txid = await rpc.sendrawtransaction(signed.raw)
    assert txid == result.txid
    assert await rpc.sendrawtransaction(signed.raw) == txid  # resubmitting is harmless
    await rpc.generatetoaddress(1, address)
    with pytest.raises(RPCAlreadyInChain):
        await rpc.sendrawtransaction(signed.raw)

    # A double spend of the now-confirmed inputs is rejected, with a reason.
    (again,) = await rpc.testmempoolaccept([signed.raw])
    assert not again.allowed and again.reject_reason


async def test_estimatesmartfee_is_none_on_fresh_regtest(rpc: BitcoinRPC) -> None:
    assert await rpc.estimatesmartfee(2) is None
    assert await rpc.estimatesmartfee(6, "economical") is None


async def test_not_found_and_wallet_errors(rpc: BitcoinRPC) -> None:
    with pytest.raises(RPCInvalidAddressOrKey):
        await rpc.getrawtransaction(b"\x11" * 32)
    with pytest.raises(RPCInvalidAddressOrKey):
        await rpc.getblockheader(b"\x22" * 32)
    with pytest.raises(RPCWalletNotFound):
        await rpc.for_wallet("absent").getbalance()


async def test_descriptor_helpers(rpc: BitcoinRPC) -> None:
    await rpc.createwallet("watch", disable_private_keys=True, blank=True)
    watch = rpc.for_wallet("watch")
    # A 2-of-3 multisig of public keys only (fixed test secrets), the shape the federation's will take.
    keys = [PrivateKey(bytes([i]) * 32).public_key.format().hex() for i in (1, 2, 3)]
    info = await rpc.getdescriptorinfo(f"wsh(multi(2,{','.join(keys)}))")
    assert not info.is_range and info.is_solvable and not info.has_private_keys
    (res,) = await watch.importdescriptors([{"desc": info.descriptor, "timestamp": "now"}])
    assert res.success, res.error


async def test_zmq_notifications_configured(bitcoind: BitcoindNode, rpc: BitcoinRPC) -> None:
    notes = await rpc.getzmqnotifications()
    assert {n.type for n in notes} == {"pubhashblock", "pubrawblock", "pubrawtx", "pubsequence"}
    assert {n.address for n in notes} == {bitcoind.zmq_endpoint}
    assert bitcoind.cli("getblockcount") == "0"
    assert hash_to_hex(await rpc.getbestblockhash()) == bitcoind.cli("getbestblockhash")
