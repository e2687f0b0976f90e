"""Routes of the bridge: federation, deposit addresses, peg-ins, peg-outs, federation coins and funding, header file
(docs/bridge.md)."""
from __future__ import annotations

import asyncio
import base64
import tempfile
from pathlib import Path
from typing import Any

from aiohttp import web

from bridge.federation import build_psbt, signed_transaction
from bridge.headers import HeaderStoreError

from ..core.errors import L2Error
from ..core.pegs import (CHANGE_CONTRACT, FUNDING_CONTRACT, FedCoin, Federation, PeginEntry, PegoutEntry,
                         bridge_totals, btc_tip, deposit_script_pubkey, descriptor_of, funded_sat, script_address,
                         witness_script)
from ..core.pegs_tx import MAX_CLAIM_TX, MAX_MERKLE_BLOCK, FederationFund
from ..core.plans import (PlanEntry, PlanStatus, coin_script_pubkey, held_coins, is_anchor_plan, pegout_paid_sat,
                          plan_tx, signatures_by_key)
from ..core.state import SUPPLY_KEY, Namespace, StateView, Supply
from ..store import Reader
from .deps import ADMISSION, BRIDGE, CHAIN, FEDERATION
from .http import HEX, ApiError, admin, field, path_hex32, read_json_object, status_query, uint


def _federation(request: web.Request) -> Federation:
    fed = request.app[FEDERATION]
    if fed is None:
        raise ApiError(404, "no-bridge", "this node runs no bridge ([bridge] enabled = false)")
    return fed


def books(r: Reader) -> dict[str, Any]:
    """The bridge's books from one read: what came in, is pending and was paid out, the coins held, and the
    invariant between them (L2 money that came in through the bridge == BTC the federation holds - peg-outs not yet
    paid)."""
    view = StateView(r.get_state)
    totals = bridge_totals(view)
    tip = btc_tip(view)
    sup = Supply.decode(bytes(r.get_state(SUPPLY_KEY) or bytes(24)))
    plans = {bytes(k[1:]): PlanEntry.decode(bytes(v)) for k, v in r.iter_prefix(bytes((Namespace.PLAN,)))}
    holdings = sum(c.amount_sat for c in held_coins(
        (FedCoin.decode(bytes(v)) for _, v in r.iter_prefix(bytes((Namespace.FED_COIN,)))), plans))
    bridged = totals.pegged_in_sat - totals.pending_out_sat - totals.paid_out_sat
    return {
        "funded_sat": funded_sat(view),
        "btc_tip": None if tip is None else {"base_height": tip.base_height, "height": tip.height,
                                             "hash": tip.block_hash[::-1].hex()},
        "pegged_in_sat": totals.pegged_in_sat, "pending_pegouts_sat": totals.pending_out_sat,
        "paid_out_sat": totals.paid_out_sat,
        "l2_supply_sat": sup.minted_sat - sup.burned_sat, "bridged_supply_sat": bridged,
        "holdings_sat": holdings, "invariant_ok": holdings - totals.pending_out_sat == bridged,
    }


async def federation(request: web.Request) -> web.Response:
    """GET /api/bridge/federation: keys, threshold, deposit rule, relayed Bitcoin tip, totals, supply invariant."""
    fed = _federation(request)
    chain = request.app[CHAIN]
    with chain.reader() as r:
        figures = books(r)
    svc = request.app[BRIDGE]
    network = chain.network
    return web.json_response({
        "threshold": fed.threshold, "keys": [k.hex() for k in fed.keys], "pegin_min_depth": fed.min_depth,
        # with an emergency path there is no sortedmulti form: GET /api/bridge/pegin-address/{account} has each
        "deposit_descriptor": None if fed.emergency_keys else
        f"wsh(sortedmulti({fed.threshold},{','.join(k.hex() for k in fed.keys)}))",
        "emergency": None if not fed.emergency_keys else {
            "threshold": fed.emergency_threshold, "keys": [k.hex() for k in fed.emergency_keys],
            "delay_blocks": fed.emergency_delay},
        "deposit_tweak": "each key P becomes P + H_tag('l2d/pegin/tweak', P || network id || account)*G; "
                         "GET /api/bridge/pegin-address/{account} gives the address",
        "change_address": script_address(deposit_script_pubkey(fed, network.id, CHANGE_CONTRACT), network),
        "funding_address": script_address(deposit_script_pubkey(fed, network.id, FUNDING_CONTRACT), network),
        **figures,
        # the circuit breaker: why this member signs no peg-outs now (None while its coins match the books)
        "halted": None if svc is None else svc.halted,
    })


async def pegin_address(request: web.Request) -> web.Response:
    """GET /api/bridge/pegin-address/{account}: the deposit address only that L2 account can claim."""
    fed = _federation(request)
    network = request.app[CHAIN].network
    account = path_hex32(request, "account")
    spk = deposit_script_pubkey(fed, network.id, account)
    return web.json_response({"account": account.hex(), "address": script_address(spk, network),
                              "script_pubkey": spk.hex(),
                              "witness_script": witness_script(fed, network.id, account).hex(),
                              "descriptor": descriptor_of(fed, network.id, account), "min_depth": fed.min_depth})


def _listing(request: web.Request, ns: Namespace) -> list[tuple[bytes, bytes]]:
    _federation(request)
    return request.app[CHAIN].records(bytes((ns,)))


async def pegins(request: web.Request) -> web.Response:
    """GET /api/bridge/pegins: every claimed deposit."""
    out: list[dict[str, Any]] = []
    for _, v in _listing(request, Namespace.PEGIN):
        e = PeginEntry.decode(v)
        out.append({"btc_txid": e.btc_txid[::-1].hex(), "vout": e.vout, "amount_sat": e.amount_sat,
                    "btc_height": e.btc_height, "recipient": e.recipient.hex()})
    return web.json_response({"pegins": out})


async def pegouts(request: web.Request) -> web.Response:
    """GET /api/bridge/pegouts: every peg-out request and where its payment stands; once COMPLETED, what its Bitcoin
    output paid (paid_sat, the payout its completed plan recorded) and its share of that transaction's fee
    (fee_share_sat = amount_sat - paid_sat), both null before."""
    _federation(request)
    chain = request.app[CHAIN]
    out: list[dict[str, Any]] = []
    with chain.reader() as r:  # the peg-outs and the plans that paid them from one read
        for k, v in r.iter_prefix(bytes((Namespace.PEGOUT,))):
            pid, e = bytes(k[1:]), PegoutEntry.decode(bytes(v))
            paid = pegout_paid_sat(r.get_state, pid, e)
            out.append({"id": pid.hex(), "status": e.status.name, "amount_sat": e.amount_sat,
                        "l2_height": e.l2_height, "address": script_address(e.script_pubkey, chain.network),
                        "btc_txid": None if e.btc_txid == bytes(32) else e.btc_txid[::-1].hex(),
                        "paid_sat": paid, "fee_share_sat": None if paid is None else e.amount_sat - paid})
    return web.json_response({"pegouts": out})


async def coins(request: web.Request) -> web.Response:
    """GET /api/bridge/coins: the federation's coins as the state records them (claimed deposits, change, funding)
    and the plan spending each."""
    fed = _federation(request)
    network = request.app[CHAIN].network
    out: list[dict[str, Any]] = []
    for _, v in _listing(request, Namespace.FED_COIN):
        c = FedCoin.decode(v)
        out.append({"txid": c.btc_txid[::-1].hex(), "vout": c.vout, "amount_sat": c.amount_sat, "kind": c.kind.name,
                    "contract": c.contract.hex(),
                    "address": script_address(coin_script_pubkey(fed, network.id, c), network),
                    "spent_by": None if c.spent_by == bytes(32) else c.spent_by[::-1].hex()})
    return web.json_response({"coins": out})


PLANS_LIMIT = 50  # plans per GET /api/bridge/plans unless ?limit= says otherwise (at most PLANS_MAX)
PLANS_MAX = 500


async def plans(request: web.Request) -> web.Response:
    """GET /api/bridge/plans[?status=PLANNED|REPLACED|COMPLETED][&limit=N]: plans (payouts, rolls, anchors), newest
    first (at most limit, default 50, at most 500): its transaction (PSBT as every member builds it, base64; none for
    an anchor, whose signers sign what they derive), which federation keys have signed, the signed transaction once m
    have, and its status. Built in a worker thread (each listed plan's
    PSBT is rebuilt and its signatures checked)."""
    fed = _federation(request)
    chain = request.app[CHAIN]
    network = chain.network
    status = status_query(request, PlanStatus.__members__, any_case=False)
    limit = uint(request.query.get("limit", str(PLANS_LIMIT)), "limit", 1, PLANS_MAX)

    def listing() -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        with chain.reader() as r:
            final = r.final_height()
            view = StateView(r.get_state)
            recorded = [(bytes(k[1:]), PlanEntry.decode(bytes(v))) for k, v in r.iter_prefix(bytes((Namespace.PLAN,)))]
            recorded = [(k, p) for k, p in recorded if status is None or p.status.name == status]
            for plan_id, p in sorted(recorded, key=lambda kp: (-kp[1].l2_height, kp[0]))[:limit]:
                ptx = plan_tx(view, fed, network.id, p)
                sigs = signatures_by_key(r.get_state, fed, plan_id)
                raw = signed_transaction(fed, network, ptx, sigs)
                out.append({
                    "id": plan_id[::-1].hex(),
                    "kind": "payout" if p.pegouts else "anchor" if is_anchor_plan(p) else "roll",
                    "status": p.status.name, "l2_height": p.l2_height,
                    "final": p.l2_height <= final,
                    "replaces": None if p.replaces == bytes(32) else p.replaces[::-1].hex(),
                    "replaced_by": None if p.replaced_by == bytes(32) else p.replaced_by[::-1].hex(),
                    "anchor_height": p.anchor_height, "feerate_sat_vb": p.feerate_sat_vb, "fee_sat": p.fee_sat,
                    "change_sat": p.change_sat,
                    "inputs": [{"txid": c.btc_txid[::-1].hex(), "vout": c.vout, "amount_sat": c.amount_sat,
                                "kind": c.kind.name} for c in ptx.coins],
                    "pegouts": [{"id": pid.hex(), "payout_sat": pay,
                                 "address": script_address(bytes(ptx.tx.vout[j].scriptPubKey), network)}
                                for j, (pid, pay) in enumerate(zip(p.pegouts, p.payouts))],
                    "threshold": fed.threshold, "signed_by": [fed.keys[i].hex() for i in sorted(sigs)],
                    "psbt": None if is_anchor_plan(p) else base64.b64encode(build_psbt(fed, network, ptx)).decode(),
                    "signed_tx": None if raw is None else raw.hex(),
                })
        return out
    return web.json_response({"plans": await asyncio.to_thread(listing)})


def _hex_field(body: dict[str, Any], name: str, limit: int) -> bytes:
    value = field(body, name, str)
    if len(value) > 2 * limit or not HEX.fullmatch(value):
        raise ApiError(400, "malformed", f"field {name!r} must be hex, at most {limit} bytes")
    return bytes.fromhex(value)


@admin
async def admin_fund(request: web.Request) -> web.Response:
    """POST /api/admin/bridge/fund {"btc_height", "vout", "tx": hex, "proof": hex}: this member records a deposit
    to the funding address as a federation coin (FederationFund, signed with its member key); 202 {"txid"}."""
    _federation(request)
    body = await read_json_object(request)
    try:
        payload = FederationFund(field(body, "btc_height", int), field(body, "vout", int),
                                 _hex_field(body, "tx", MAX_CLAIM_TX), _hex_field(body, "proof", MAX_MERKLE_BLOCK))
    except L2Error as e:
        raise ApiError(400, "out-of-range", str(e)) from None
    txid = request.app[ADMISSION].submit_as_member(payload)
    return web.json_response({"txid": txid.hex()}, status=202)


async def headers_file(request: web.Request) -> web.StreamResponse:
    """GET /api/bridge/headers[?from=H&to=H]: the header store's best chain as a header file
    (docs/header-file.md) for `l2-verify headers`."""
    _federation(request)
    svc = request.app[BRIDGE]
    if svc is None or svc.headers is None:
        raise ApiError(404, "no-header-store", "this node follows no bitcoind (no header store)")
    q = request.query
    lo = None if "from" not in q else uint(q["from"], "height")
    hi = None if "to" not in q else uint(q["to"], "height")
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "btc.headers"
        try:
            await asyncio.to_thread(svc.headers.export, path, lo, hi)
        except HeaderStoreError as e:
            raise ApiError(400, "bad-range", str(e)) from None
        body = path.read_bytes()
    return web.Response(body=body, content_type="application/octet-stream")


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get("/api/bridge/federation", federation)
    r.add_get("/api/bridge/pegin-address/{account}", pegin_address)
    r.add_get("/api/bridge/pegins", pegins)
    r.add_get("/api/bridge/pegouts", pegouts)
    r.add_get("/api/bridge/coins", coins)
    r.add_get("/api/bridge/plans", plans)
    r.add_post("/api/admin/bridge/fund", admin_fund)
    r.add_get("/api/bridge/headers", headers_file)
