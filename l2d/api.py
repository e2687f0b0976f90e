"""REST API (aiohttp): status, state, accounts with proofs, blocks, transaction submission, metrics, admin.

Every error leaves as a JSON body {"error": code, "message": text} with a 4xx status for bad client input;
an unexpected exception is logged and answered with a JSON 500. Nothing unauthenticated changes state
except a valid signed transaction.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Optional

from aiohttp import web

from .core.anchor import AnchorEntry, anchor_key
from .core.anchor_tx import AnchorUpdate
from .core.block import Block
from .core.coin_tx import Burn, Transfer
from .core.errors import Rejected
from .core.params import MAX_MONEY
from .core.snapshot import SnapshotExists
from .core.state import account_key
from .core.tx import MAX_TX_SIZE, Transaction
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

if TYPE_CHECKING:
    from .node import Node

log = logging.getLogger(__name__)

NODE_KEY: web.AppKey["Node"] = web.AppKey("node")
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_HEX = re.compile(r"(?:[0-9a-fA-F]{2})*")
_DIGITS = re.compile(r"[0-9]{1,20}")
_STATUS_CODES = {400: "bad-request", 401: "unauthorized", 403: "forbidden", 404: "not-found",
                 405: "method-not-allowed", 409: "conflict", 408: "request-timeout", 411: "length-required",
                 413: "body-too-large", 415: "unsupported-media-type", 422: "unprocessable", 429: "too-many-requests"}
_KEEP_HEADERS = ("Allow", "WWW-Authenticate", "Retry-After")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ApiError(Exception):
    """An error answered with status and a JSON body {"error": code, "message": message}."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def json_error(status: int, code: str, message: str, headers: Optional[dict[str, str]] = None) -> web.Response:
    """The JSON error response every failure path uses."""
    return web.json_response({"error": code, "message": message}, status=status, headers=headers)


def _route_label(request: web.Request) -> str:
    """The route template (bounded label cardinality), or "unmatched"."""
    route = request.match_info.route
    resource = route.resource if route is not None else None
    if resource is None:
        return "unmatched"
    return resource.canonical


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Turn every exception into a JSON error response and count the request."""
    resp: web.StreamResponse
    try:
        resp = await handler(request)
    except ApiError as e:
        resp = json_error(e.status, e.code, e.message, e.headers)
    except Rejected as e:  # a transaction refused at admission: the reason code is the error
        resp = json_error(400, e.reason, str(e))
    except web.HTTPException as e:
        if e.status < 400:
            raise
        headers = {k: e.headers[k] for k in _KEEP_HEADERS if k in e.headers}
        code = _STATUS_CODES.get(e.status, "http-error")
        message = e.text if e.text and not e.text.startswith(f"{e.status}:") else (e.reason or code)
        resp = json_error(e.status, code, message, headers)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("unhandled error serving %s %s", request.method, request.path)
        resp = json_error(500, "internal", "internal error (logged)")
    request.app[NODE_KEY].metrics.http_requests.inc(path=_route_label(request), status=str(resp.status))
    return resp


# -- request parsing -------------------------------------------------------------------------------------------
def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


async def read_json_object(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object; 415 for another content type, 413 when too large, 400 when not an object."""
    body = await request.read()  # raises HTTPRequestEntityTooLarge past client_max_size
    if allow_empty and not body.strip():
        return {}
    if request.content_type != "application/json":
        raise ApiError(415, "unsupported-media-type",
                       f"Content-Type must be application/json, got {request.content_type!r}")
    try:
        value = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:
        raise ApiError(400, "malformed", f"body is not valid JSON: {str(e)[:200]}") from None
    if not isinstance(value, dict):
        raise ApiError(400, "malformed", f"body must be a JSON object, got {type(value).__name__}")
    return value


def _field(obj: dict[str, Any], name: str, typ: type) -> Any:
    if name not in obj:
        raise ApiError(400, "missing-field", f"field {name!r} is required")
    v = obj[name]
    if typ is int and (isinstance(v, bool) or not isinstance(v, int)):
        raise ApiError(400, "bad-field", f"field {name!r} must be an integer, got {type(v).__name__}")
    if not isinstance(v, typ):
        raise ApiError(400, "bad-field", f"field {name!r} must be a {typ.__name__}, got {type(v).__name__}")
    return v


def _hex32(s: str, what: str) -> bytes:
    if not _HEX64.fullmatch(s):
        raise ApiError(400, "malformed", f"{what} must be 64 hex characters")
    return bytes.fromhex(s)


def node_of(request: web.Request) -> "Node":
    """The node serving this request (for the subsystems' route modules)."""
    return request.app[NODE_KEY]


def path_hex32(request: web.Request, name: str) -> bytes:
    """Path parameter `name` as 32 bytes from 64 hex characters; 400 malformed otherwise."""
    return _hex32(request.match_info[name], name)


def _height(s: str) -> int:
    if not _DIGITS.fullmatch(s) or int(s) >= 2**64:
        raise ApiError(400, "malformed", f"height must be a non-negative integer below 2^64, got {s[:40]!r}")
    return int(s)


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


# -- public endpoints ------------------------------------------------------------------------------------------
async def health(request: web.Request) -> web.Response:
    """GET /health: the process answers."""
    return web.json_response({"ok": True})


async def status(request: web.Request) -> web.Response:
    """GET /api/status."""
    node = request.app[NODE_KEY]
    tip = node.tip
    return web.json_response({
        "network": node.network.name, "height": tip.height, "tip_hash": tip.hash.hex(),
        "state_root": tip.state_root.hex(), "mempool_size": len(node.mempool),
        "uptime_s": round(node.uptime_s(), 3), "version": node.version,
    })


async def l2_state(request: web.Request) -> web.Response:
    """GET /api/l2/state: tip, record count and supply, all from one consistent read."""
    s = request.app[NODE_KEY].state_summary()
    return web.json_response({
        "height": s.height, "tip_hash": s.tip_hash.hex(), "state_root": s.state_root.hex(), "records": s.records,
        "supply": {"minted_sat": s.supply.minted_sat, "burned_sat": s.supply.burned_sat,
                   "fees_sat": s.supply.fees_sat},
    })


async def account(request: web.Request) -> web.Response:
    """GET /api/l2/accounts/{id}: balance, nonce and an inclusion or non-inclusion proof."""
    node = request.app[NODE_KEY]
    pubkey = _hex32(request.match_info["id"], "account id")
    a = await node.account(pubkey)
    return web.json_response({
        "account": pubkey.hex(), "exists": a.account is not None,
        "balance_sat": a.account.balance_sat if a.account else 0, "nonce": a.account.nonce if a.account else 0,
        "height": a.height, "state_root": a.state_root.hex(), "key": account_key(pubkey).hex(),
        "proof": a.proof.encode().hex(),
    })


async def block(request: web.Request) -> web.Response:
    """GET /api/l2/blocks/{height}."""
    node = request.app[NODE_KEY]
    height = _height(request.match_info["height"])
    raw = node.store.get_block(height)
    if raw is None:
        raise ApiError(404, "not-found", f"no block at height {height} (tip is {node.tip.height})")
    b = Block.decode(raw, node.network)
    h = b.header
    return web.json_response({
        "height": h.height, "hash": h.hash.hex(), "prev_hash": h.prev_hash.hex(), "timestamp_ms": h.timestamp_ms,
        "tx_count": h.tx_count, "tx_root": h.tx_root.hex(), "state_root": h.state_root.hex(),
        "txs": [tx_json(t) for t in b.txs], "raw": raw.hex(),
    })


async def tx_status(request: web.Request) -> web.Response:
    """GET /api/l2/tx/{txid}: committed (authoritative, from the store), pending, or recently dropped."""
    node = request.app[NODE_KEY]
    txid = _hex32(request.match_info["txid"], "txid")
    st = node.tx_status(txid)
    if st is None:
        raise ApiError(404, "not-found", f"transaction {txid.hex()} is unknown")
    return web.json_response({"txid": txid.hex(), **st})


async def submit_tx(request: web.Request) -> web.Response:
    """POST /api/l2/tx {"tx": hex}: 202 {"txid"} once admitted to the mempool, else 400 with the reason."""
    node = request.app[NODE_KEY]
    body = await read_json_object(request)
    tx_hex = _field(body, "tx", str)
    if len(tx_hex) > 2 * MAX_TX_SIZE + 2 or not _HEX.fullmatch(tx_hex):
        raise ApiError(400, "malformed", "field 'tx' must be the transaction's hex encoding")
    txid = node.submit(bytes.fromhex(tx_hex))
    return web.json_response({"txid": txid.hex()}, status=202)


async def metrics(request: web.Request) -> web.Response:
    """GET /metrics: Prometheus text format."""
    text = request.app[NODE_KEY].render_metrics()
    return web.Response(body=text.encode(), headers={"Content-Type": METRICS_CONTENT_TYPE})


# -- admin -----------------------------------------------------------------------------------------------------
def _check_admin(request: web.Request) -> None:
    """401 unless the request carries the configured bearer token (constant-time comparison)."""
    token: str = request.app[NODE_KEY].config.api.admin_token or ""
    challenge = {"WWW-Authenticate": 'Bearer realm="l2d-admin"'}
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if not header or scheme.lower() != "bearer":
        raise ApiError(401, "unauthorized", "admin endpoint: send 'Authorization: Bearer <token>'", challenge)
    given_b = given.strip().encode("utf-8", "surrogateescape")
    # An empty configured token disables the admin API rather than accepting an empty bearer.
    if not token or not hmac.compare_digest(given_b, token.encode("utf-8")):
        raise ApiError(401, "unauthorized", "admin token rejected",
                       {"WWW-Authenticate": 'Bearer realm="l2d-admin", error="invalid_token"'})


def admin(handler: Handler) -> Handler:
    """Decorator: authenticate before anything else (including reading the body)."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        _check_admin(request)
        return await handler(request)

    wrapped.__name__ = handler.__name__
    wrapped.__doc__ = handler.__doc__
    return wrapped


@admin
async def admin_mint(request: web.Request) -> web.Response:
    """POST /api/admin/mint {"recipient": hex, "amount_sat": int}: 202 {"txid"}; 403 where minting is off."""
    node = request.app[NODE_KEY]
    if not node.network.admin_mint:
        raise ApiError(403, "forbidden", f"minting is not allowed on {node.network.name}")
    body = await read_json_object(request)
    recipient = _hex32(_field(body, "recipient", str), "recipient")
    amount = _field(body, "amount_sat", int)
    if not 0 < amount <= MAX_MONEY:
        raise ApiError(400, "out-of-range", f"amount_sat must be in 1..{MAX_MONEY}")
    txid = node.mint(recipient, amount)
    return web.json_response({"txid": txid.hex()}, status=202)


@admin
async def admin_snapshot(request: web.Request) -> web.Response:
    """POST /api/admin/snapshot: write a snapshot of the committed tip now."""
    node = request.app[NODE_KEY]
    await read_json_object(request, allow_empty=True)
    try:
        info = await node.snapshot_now(trigger="admin")
    except SnapshotExists as e:  # the directory holds another chain's snapshot at this height
        raise ApiError(409, "conflict", str(e)) from None
    return web.json_response({"name": info.name, "height": info.height, "state_root": info.state_root.hex(),
                              "block_hash": info.block_hash.hex(), "size": info.size})


@admin
async def admin_get_snapshot(request: web.Request) -> web.StreamResponse:
    """GET /api/admin/snapshots/{name}: the file, if name is one of the snapshot directory's entries."""
    node = request.app[NODE_KEY]
    path = node.snapshot_path(request.match_info["name"])
    if path is None:
        raise ApiError(404, "not-found", "no such snapshot")
    return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


async def admin_list_snapshots(request: web.Request) -> web.Response:
    """GET /api/admin/snapshots: names and sizes (admin)."""
    _check_admin(request)
    node = request.app[NODE_KEY]
    return web.json_response({"snapshots": node.list_snapshots()})


# -- anchors ------------------------------------------------------------------------------------------------------
def _anchor_json(node: "Node", a: Any) -> dict[str, Any]:
    d: dict[str, Any] = a.to_json()
    raw = node.store.get_state(anchor_key(a.l2_height))
    if raw is None:
        d["l2_state"] = None
    else:
        e = AnchorEntry.decode(raw)
        d["l2_state"] = {"status": e.status.name, "btc_txid": e.btc_txid[::-1].hex(),
                         "btc_block_hash": e.btc_block_hash[::-1].hex(), "btc_height": e.btc_height,
                         "state_root": e.state_root.hex()}
    return d


def _anchor_service(request: web.Request) -> Any:
    node = request.app[NODE_KEY]
    if node.anchor_service is None:
        raise ApiError(404, "not-found", "anchoring is not enabled on this node")
    return node.anchor_service


async def anchors(request: web.Request) -> web.Response:
    """GET /api/anchors[?status=S]: every anchor with its status, Bitcoin txid/height, L2 height and root."""
    node = request.app[NODE_KEY]
    svc = _anchor_service(request)
    want = request.query.get("status")
    items = [_anchor_json(node, a) for a in svc.all_anchors() if want is None or a.status.value == want.upper()]
    return web.json_response({"broadcasting": svc.rpc is not None, "mode": svc.config.mode,
                              "every_blocks": svc.config.every_blocks, "btc_tip_height": svc.btc_tip_height,
                              "anchors": items})


async def anchors_latest(request: web.Request) -> web.Response:
    """GET /api/anchors/latest: the anchor of the highest L2 height (404 if none yet)."""
    a = _anchor_service(request).latest()
    if a is None:
        raise ApiError(404, "not-found", "no anchor yet")
    return web.json_response(_anchor_json(request.app[NODE_KEY], a))


async def anchor_audit(request: web.Request) -> web.Response:
    """GET /api/anchors/{l2_height}/audit: the audit bundle file (404 until the anchor is confirmed)."""
    svc = _anchor_service(request)
    height = _height(request.match_info["l2_height"])
    if svc.rpc is None:
        raise ApiError(404, "not-found", "no bitcoind configured: anchors are not broadcast, so none is confirmed")
    bundle = await svc.audit_bundle(height)
    if bundle is None:
        raise ApiError(404, "not-found", f"no confirmed anchor at L2 height {height}")
    return web.Response(body=bundle, content_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="audit-{height}.l2audit"'})


def make_app(node: "Node") -> web.Application:
    """The aiohttp application serving node."""
    app = web.Application(client_max_size=node.config.api.max_body_bytes, middlewares=[error_middleware])
    app[NODE_KEY] = node
    r = app.router
    r.add_get("/health", health)
    r.add_get("/api/status", status)
    r.add_get("/api/l2/state", l2_state)
    r.add_get("/api/l2/accounts/{id}", account)
    r.add_get("/api/l2/blocks/{height}", block)
    r.add_get("/api/l2/tx/{txid}", tx_status)
    r.add_post("/api/l2/tx", submit_tx)
    r.add_get("/metrics", metrics)
    r.add_get("/api/anchors", anchors)
    r.add_get("/api/anchors/latest", anchors_latest)
    r.add_get("/api/anchors/{l2_height}/audit", anchor_audit)
    r.add_post("/api/admin/mint", admin_mint)
    r.add_post("/api/admin/snapshot", admin_snapshot)
    r.add_get("/api/admin/snapshots", admin_list_snapshots)
    r.add_get("/api/admin/snapshots/{name}", admin_get_snapshot)
    from . import api_bridge, api_fl, api_work  # each subsystem's routes in its own module

    for sub in (api_bridge, api_work, api_fl):
        sub.add_routes(r)
    return app
