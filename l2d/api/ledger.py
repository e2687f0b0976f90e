"""Routes of the ledger itself: health, status, state, accounts with proofs, blocks, transactions, metrics,
and the admin endpoints (mint, snapshots). Nothing unauthenticated changes state except a valid signed
transaction."""
from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from ..core.anchor_tx import AnchorUpdate
from ..core.block import Block
from ..core.coin_tx import Burn, Transfer
from ..core.params import MAX_MONEY
from ..core.snapshot import SnapshotExists
from ..core.state import account_key
from ..core.errors import DecodeError, OutOfRange, Rejected
from ..core.hashing import H_TXID
from ..core.tx import MAX_TX_SIZE, Transaction
from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..txbatch import MAX_BATCH, decode_batch
from ..views import AccountView
from . import dashboard
from .deps import ADMISSION, CHAIN, MEMBERS, SIGNATURES, SNAPSHOTS
from .http import HEX, ApiError, admin, field, hex32, path_hex32, read_json_object, uint


def tx_json(tx: Transaction) -> dict[str, Any]:
    """A transaction as JSON: envelope fields and its payload fields."""
    d: dict[str, Any] = {"txid": tx.txid.hex(), "type": tx.type.name.lower(), "sender": tx.sender.hex(),
                         "nonce": tx.nonce, "fee_sat": tx.fee_sat}
    p = tx.payload
    if isinstance(p, Transfer):  # Mint is a Transfer subclass: same fields
        d.update(recipient=p.recipient.hex(), amount_sat=p.amount_sat)
    elif isinstance(p, Burn):
        d.update(amount_sat=p.amount_sat, destination=p.destination.hex())
    elif isinstance(p, AnchorUpdate):
        d.update(l2_height=p.l2_height, state_root=p.state_root.hex(), btc_txid=p.btc_txid[::-1].hex(),
                 btc_block_hash=p.btc_block_hash[::-1].hex(), btc_height=p.btc_height, status=p.status.name)
    return d


async def health(request: web.Request) -> web.Response:
    """GET /health: the process answers."""
    return web.json_response({"ok": True})


async def status(request: web.Request) -> web.Response:
    """GET /api/status."""
    chain = request.app[CHAIN]
    tip = chain.tip
    return web.json_response({
        "network": chain.network.name, "height": tip.height, "tip_hash": tip.hash.hex(),
        "final_height": chain.final.height,
        "state_root": tip.state_root.hex(), "mempool_size": len(chain.mempool),
        "uptime_s": round(chain.uptime_s(), 3), "version": chain.version,
    })


async def l2_state(request: web.Request) -> web.Response:
    """GET /api/l2/state: tip, record count and supply, all from one consistent read."""
    s = request.app[CHAIN].state_summary()
    return web.json_response({
        "height": s.height, "tip_hash": s.tip_hash.hex(), "state_root": s.state_root.hex(), "records": s.records,
        "supply": {"minted_sat": s.supply.minted_sat, "burned_sat": s.supply.burned_sat,
                   "fees_sat": s.supply.fees_sat},
    })


async def account(request: web.Request) -> web.Response:
    """GET /api/l2/accounts/{id}: balance, nonce and an inclusion or non-inclusion proof."""
    pubkey = hex32(request.match_info["id"], "account id")
    return web.json_response(account_json(pubkey, await request.app[CHAIN].account(pubkey)))


def account_json(pubkey: bytes, a: AccountView) -> dict[str, Any]:
    """The body of GET /api/l2/accounts/{id} (also served by the read-only API processes, l2d/readapi.py)."""
    return {
        "account": pubkey.hex(), "exists": a.account is not None,
        "balance_sat": a.account.balance_sat if a.account else 0, "nonce": a.account.nonce if a.account else 0,
        "height": a.height, "state_root": a.state_root.hex(), "key": account_key(pubkey).hex(),
        "proof": a.proof.encode().hex(),
    }


async def block(request: web.Request) -> web.Response:
    """GET /api/l2/blocks/{height}."""
    chain = request.app[CHAIN]
    h_ = uint(request.match_info["height"], "height")
    raw = chain.raw_block(h_)
    if raw is None:
        raise ApiError(404, "not-found", f"no block at height {h_} (tip is {chain.tip.height})")
    b = Block.decode(raw, chain.network)
    h = b.header
    members = request.app[MEMBERS].members
    commit = chain.block_commit(h_, members.n)
    return web.json_response({
        "height": h.height, "hash": h.hash.hex(), "prev_hash": h.prev_hash.hex(), "timestamp_ms": h.timestamp_ms,
        "tx_count": h.tx_count, "tx_root": h.tx_root.hex(), "state_root": h.state_root.hex(),
        "txs": [tx_json(t) for t in b.txs], "raw": raw.hex(), "final": h.height <= chain.final.height,
        "commit": None if commit is None else {"signers": list(commit.signers), "threshold": members.threshold,
                                               "raw": commit.encode().hex()},
    })


async def tx_status(request: web.Request) -> web.Response:
    """GET /api/l2/tx/{txid}: committed (authoritative, from the store), pending, or dropped (with the reason);
    404 with "status": "unknown" for a transaction this node never accepted (or whose drop it has forgotten)."""
    txid = path_hex32(request, "txid")
    st = request.app[ADMISSION].tx_status(txid)
    if st is None:
        return web.json_response({"error": "not-found", "message": f"transaction {txid.hex()} is unknown",
                                  "txid": txid.hex(), "status": "unknown"}, status=404)
    return web.json_response({"txid": txid.hex(), **st})


async def submit_tx(request: web.Request) -> web.Response:
    """POST /api/l2/tx {"tx": hex}: 202 {"txid"} once admitted to the mempool, else 400 with the reason."""
    body = await read_json_object(request)
    tx_hex = field(body, "tx", str)
    if len(tx_hex) > 2 * MAX_TX_SIZE + 2 or not HEX.fullmatch(tx_hex):
        raise ApiError(400, "malformed", "field 'tx' must be the transaction's hex encoding")
    txid = request.app[ADMISSION].submit(bytes.fromhex(tx_hex))
    return web.json_response({"txid": txid.hex()}, status=202)


ADMIT_SLICE = 50  # transactions of a batch admitted between two turns of the event loop


async def submit_txs(request: web.Request) -> web.Response:
    """POST /api/l2/txs: up to MAX_BATCH transactions, as application/octet-stream (each `length u32 | bytes`,
    l2d/txbatch.py) or JSON {"txs": [hex, ...]}; 200 with one result per transaction, in order: {"txid", "status":
    "pending"} once admitted, or {"txid", "error": reason, "message"}. Signatures are checked in worker processes
    (l2d/sigpool.py), then each transaction is admitted in order as POST /api/l2/tx would. 400 for a body that is
    not a batch (nothing admitted)."""
    if request.content_type == "application/octet-stream":
        try:
            raws = decode_batch(await request.read())
        except OutOfRange as e:  # more than MAX_BATCH entries, or an entry no transaction can be: as for JSON
            raise ApiError(400, "out-of-range", f"not a batch body: {e}") from None
        except DecodeError as e:
            raise ApiError(400, "malformed", f"not a batch body: {e}") from None
    else:
        items = field(await read_json_object(request), "txs", list)
        if len(items) > MAX_BATCH:
            raise ApiError(400, "out-of-range", f"at most {MAX_BATCH} transactions per batch")
        if not all(isinstance(t, str) and len(t) <= 2 * MAX_TX_SIZE and HEX.fullmatch(t) for t in items):
            raise ApiError(400, "malformed", "field 'txs' must be a list of transactions' hex encodings")
        raws = [bytes.fromhex(t) for t in items]
    if not raws:
        raise ApiError(400, "malformed", "an empty batch")
    admission = request.app[ADMISSION]
    admission.check_space()  # once for the batch: 503 disk-low, nothing admitted
    results: list[dict[str, Any]] = []
    for i, (raw, ok) in enumerate(zip(raws, await request.app[SIGNATURES].check(raws))):
        if i and i % ADMIT_SLICE == 0:
            await asyncio.sleep(0)  # let other requests (reads) in between slices of a large batch
        try:
            txid = admission.submit_checked(raw, ok)
        except Rejected as e:
            results.append({"txid": H_TXID(raw).hex(), "error": e.reason, "message": str(e)})
        else:
            results.append({"txid": txid.hex(), "status": "pending"})
    return web.json_response({"results": results})


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    subsystems = dashboard.metric_lines(await dashboard.snapshot(request.app))  # anchors, bridge, work, FL, NetFlow...
    text = request.app[CHAIN].render_metrics() + "\n".join(subsystems) + "\n"
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


# -- admin -----------------------------------------------------------------------------------------------------
@admin
async def admin_mint(request: web.Request) -> web.Response:
    """POST /api/admin/mint {"recipient": hex, "amount_sat": int}: 202 {"txid"}; 403 where minting is off."""
    network = request.app[CHAIN].network
    if not network.admin_mint:
        raise ApiError(403, "forbidden", f"minting is not allowed on {network.name}")
    body = await read_json_object(request)
    recipient = hex32(field(body, "recipient", str), "recipient")
    amount = field(body, "amount_sat", int)
    if not 0 < amount <= MAX_MONEY:
        raise ApiError(400, "out-of-range", f"amount_sat must be in 1..{MAX_MONEY}")
    txid = request.app[ADMISSION].mint(recipient, amount)
    return web.json_response({"txid": txid.hex()}, status=202)


@admin
async def admin_snapshot(request: web.Request) -> web.Response:
    """POST /api/admin/snapshot: write a snapshot of the committed tip now."""
    await read_json_object(request, allow_empty=True)
    try:
        info = await request.app[SNAPSHOTS].snapshot_now(trigger="admin")
    except SnapshotExists as e:  # the directory holds another chain's snapshot at this height
        raise ApiError(409, "conflict", str(e)) from None
    return web.json_response({"name": info.name, "height": info.height, "state_root": info.state_root.hex(),
                              "block_hash": info.block_hash.hex(), "size": info.size})


@admin
async def admin_get_snapshot(request: web.Request) -> web.StreamResponse:
    """GET /api/admin/snapshots/{name}: the file, if name is one of the snapshot directory's entries."""
    path = request.app[SNAPSHOTS].snapshot_path(request.match_info["name"])
    if path is None:
        raise ApiError(404, "not-found", "no such snapshot")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


@admin
async def admin_list_snapshots(request: web.Request) -> web.Response:
    """GET /api/admin/snapshots: names and sizes (admin)."""
    return web.json_response({"snapshots": request.app[SNAPSHOTS].list_snapshots()})


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/health", health)
    r.add_get("/api/status", status)
    r.add_get("/api/l2/state", l2_state)
    r.add_get("/api/l2/accounts/{id}", account)
    r.add_get("/api/l2/blocks/{height}", block)
    r.add_get("/api/l2/tx/{txid}", tx_status)
    r.add_post("/api/l2/tx", submit_tx)
    r.add_post("/api/l2/txs", submit_txs)
    r.add_get("/metrics", metrics)
    r.add_post("/api/admin/mint", admin_mint)
    r.add_post("/api/admin/snapshot", admin_snapshot)
    r.add_get("/api/admin/snapshots", admin_list_snapshots)
    r.add_get("/api/admin/snapshots/{name}", admin_get_snapshot)
