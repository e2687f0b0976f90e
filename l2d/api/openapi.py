"""The REST API's contract: an OpenAPI 3.1 document of every route the daemon serves, served at GET
/api/openapi.json and built here from small helpers and the route modules' own facts (status enums, size limits,
the rate-limited routes).

Every operation lists each status its handler answers; every error has the one JSON body of l2d/api/http.py
(`Error`). Added to each operation from what it is: 401 (with WWW-Authenticate) on the admin routes, which take
`Authorization: Bearer <api.admin_token>`; 413 on those that read a body, and 415 and 400 on those that read a JSON
one; 429 (with Retry-After) on those l2d/api/limits.py limits; 503 (with Retry-After) where a transaction is
admitted (the data dir's disk is low). tests/l2d/api/test_openapi.py fails when a route has no operation here or an
operation no route, and runs schemathesis against a real daemon with this document: no 5xx, every response as
described. The member transport's routes (l2d/federation/transport.py) are not here: see MEMBER_ROUTES_NOTE.
"""
from __future__ import annotations

import enum
import functools
from typing import Any, Iterable, Mapping, Optional

from aiohttp import web

from anchoring.service import AnchorState

from .. import __version__
from ..core.fl import JobStatus
from ..core.fl_tx import MAX_PARTICIPANTS, PPM
from ..core.model import CompletionStatus, Loser
from ..core.model_tx import ModelFormat, Sampling
from ..core.params import MAX_MONEY
from ..core.pegs import CoinKind
from ..core.pegs_tx import BTC_HEADER_SIZE, MAX_CLAIM_TX, MAX_MERKLE_BLOCK, PegoutStatus
from ..core.plans import PlanStatus
from ..core.relay import RelayStatus
from ..core.session import SessionStatus
from ..core.tx import MAX_TX_SIZE
from ..core.work import Outcome, TaskPhase, TaskStatus, WorkerStatus
from ..core.work_tx import Role
from ..txbatch import MAX_BATCH
from .bridge import PLANS_MAX
from .federation import MAX_COMMITS
from .limits import EXPENSIVE_GETS

Schema = dict[str, Any]

OPENAPI_PATH = "/api/openapi.json"
MEMBER_ROUTES_NOTE = ("the member transport's routes (GET /api/federation/ws, GET /api/federation/blocks, POST "
                      "/api/federation/txs) are the federation's wire protocol between members, not part of this API: "
                      "every request is signed by a member key (or is a WebSocket handshake), bodies are binary "
                      "frames and errors are plain text; docs/federation.md describes them")
U64 = 2**64 - 1
U32 = 2**32 - 1
U16 = 2**16 - 1

# -- schemas ---------------------------------------------------------------------------------------------------
STR: Schema = {"type": "string"}
INT: Schema = {"type": "integer"}
NAT: Schema = {"type": "integer", "minimum": 0}
BOOL: Schema = {"type": "boolean"}
NUM: Schema = {"type": "number"}
NULL: Schema = {"type": "null"}
BINARY: Schema = {"type": "string", "format": "binary"}


def uint(hi: int = U64, lo: int = 0) -> Schema:
    return {"type": "integer", "minimum": lo, "maximum": hi}


def hex_in(nbytes: Optional[int] = None, max_bytes: Optional[int] = None, min_bytes: int = 0) -> Schema:
    """Hex as a client may send it (either case): exactly nbytes, or whole bytes from min_bytes up to max_bytes."""
    if nbytes is not None:
        return {"type": "string", "pattern": f"^[0-9a-fA-F]{{{2 * nbytes}}}$"}
    s: Schema = {"type": "string", "pattern": "^(?:[0-9a-fA-F]{2})*$"}
    if min_bytes:
        s["minLength"] = 2 * min_bytes
    if max_bytes is not None:
        s["maxLength"] = 2 * max_bytes
    return s


def hex_out(nbytes: Optional[int] = None) -> Schema:
    """Hex as the daemon writes it (lower case): exactly nbytes, or any whole number of bytes."""
    return {"type": "string", "pattern": f"^[0-9a-f]{{{2 * nbytes}}}$" if nbytes else "^(?:[0-9a-f]{2})*$"}


H32 = hex_out(32)  # hashes, ids, x-only keys (txids of Bitcoin in display order)
HEX = hex_out()


def null(s: Schema) -> Schema:
    return {"anyOf": [s, NULL]}


def arr(items: Schema, **kw: Any) -> Schema:
    return {"type": "array", "items": items, **kw}


def obj(props: Mapping[str, Schema], optional: Optional[Mapping[str, Schema]] = None, **kw: Any) -> Schema:
    """An object with every key of props required (others allowed: responses may grow), and the optional ones."""
    return {"type": "object", "required": list(props), "properties": {**props, **(optional or {})}, **kw}


def names(e: type[enum.Enum], lower: bool = False) -> Schema:
    """A member's name as the daemon writes it."""
    return {"type": "string", "enum": [m.name.lower() if lower else m.name for m in e]}


def any_case(values: Iterable[str]) -> Schema:
    """One of values, in any mix of upper and lower case (what `value.upper() in ...` accepts)."""
    alts = ("".join(f"[{c.upper()}{c.lower()}]" if c.isalpha() else c for c in v) for v in values)
    return {"type": "string", "pattern": f"^(?:{'|'.join(alts)})$"}


def ref(name: str) -> Schema:
    return {"$ref": f"#/components/schemas/{name}"}


ERROR: Schema = obj({"error": {"type": "string", "pattern": "^[a-z0-9]+(?:-[a-z0-9]+)*$",
                               "description": "a short code: malformed, missing-field, bad-field, out-of-range, "
                                              "not-found, unauthorized, the admission's rejection reason..."},
                     "message": {"type": "string", "description": "what was wrong, for a person"}})
TXID = obj({"txid": H32})
SUPPLY = obj({"minted_sat": NAT, "burned_sat": NAT, "fees_sat": NAT})
TX = obj({"txid": H32, "type": STR, "sender": H32, "nonce": NAT, "fee_sat": NAT},
         {"recipient": H32, "amount_sat": NAT, "destination": HEX, "l2_height": NAT, "state_root": H32,
          "btc_txid": H32, "btc_block_hash": H32, "btc_height": NAT, "status": STR})
PROVEN = {"key": HEX, "value": HEX, "proof": HEX, "state_root": H32, "tip_height": NAT}  # a record with its proof
L2_ANCHOR = obj({"status": STR, "btc_txid": H32, "btc_block_hash": H32, "btc_height": NAT, "state_root": H32})
ANCHOR = obj({"l2_height": NAT, "state_root": H32, "status": names(AnchorState), "mode": STR, "txid": null(H32),
              "btc_block_hash": null(H32), "btc_height": null(NAT), "confirmations": NAT, "fee_sat": NAT,
              "vsize": NAT, "record": HEX, "link": HEX, "replaced_txids": arr(H32),
              "accept_latency_ms": null(NUM), "l2_state": null(L2_ANCHOR)})
WORKER = obj({
    "worker": H32, "status": names(WorkerStatus), "stake_sat": NAT, "reputation_ppm": NAT, "slashes": NAT,
    "tasks_done": NAT, "tasks_failed": NAT, "active_tasks": NAT, "last_heartbeat": NAT, "registered_height": NAT,
    "exit_height": NAT,
    "capabilities": obj({"device": NAT, "accel_mem_mb": NAT, "price_sat": NAT, "green_ppm": NAT,
                         "carbon_g_per_kwh": NAT, "capacity": NAT, "region": STR, "models": arr(STR),
                         "endpoint": STR})},
    {"live": obj({"latency_ema_us": null(NUM), "probe_failures": NAT, "schedulable": BOOL})})
TASK = obj({
    "task_id": H32, "status": names(TaskStatus), "outcome": names(Outcome), "submitter": H32, "bounty_sat": NAT,
    "submit_height": NAT, "worker": null(H32), "backup": null(H32), "verifier": null(H32), "referee": null(H32),
    "deadline_height": NAT, "window_blocks": NAT, "result_height": NAT, "timeouts": NAT,
    "waiting_for": arr(names(Role, lower=True)),
    "phase": {**names(TaskPhase, lower=True), "description": "what the task waits for next: assignment, results "
              "(of waiting_for's roles, by deadline_height), challenge_window (settled from window_ends_height on), "
              "dispute, referee, resolution, done"},
    "window_ends_height": {**null(NAT), "description": "result_height + window_blocks: the first L2 height the task "
                           "may be settled at; null where no challenge window applies"},
    "spec": obj({"model": STR, "images": NAT, "region": STR, "min_reputation_ppm": NAT, "max_price_sat": NAT}),
    "results": {"type": "object", "additionalProperties": obj({"output": arr(INT), "fingerprint": HEX})}})
FL_PARTICIPANT = obj({"key": H32, "node_key": STR, "accepted_examples": NAT, "rounds_accepted": NAT,
                      "reward_sat": NAT, "register_height": NAT})
FL_JOB = obj({
    "job_id": H32, "status": names(JobStatus), "poster": H32, "reward_pool_sat": NAT, "config_hash": H32,
    "rounds": NAT, "min_participants": NAT, "max_participants": NAT, "post_height": NAT, "rounds_done": NAT,
    "last_params_hash": null(H32), "paid_sat": NAT, "refunded_sat": NAT, "finish_height": NAT,
    "participants": arr(FL_PARTICIPANT)})
FL_ROUND = obj({
    "round": NAT, "height": NAT, "params_hash": H32, "prev_params_hash": H32,
    "metrics": obj({"accuracy_ppm": NAT, "loss_ppm": NAT, "update_bytes": NAT, "dp_epsilon_ppm": NAT}),
    "participants": arr(obj({"key": H32, "num_examples": NAT, "accepted": BOOL})), "model_available": BOOL})
REWARDS: Schema = {"type": "object", "propertyNames": H32, "additionalProperties": NAT,
                   "description": "sat by participant key"}
OFFER = obj({"worker": H32, "endpoint": STR, "region": STR, "reputation_ppm": NAT, "green_ppm": NAT, "stake_sat": NAT,
             "context_length": NAT, "price_in_msat_per_1k": NAT, "price_out_msat_per_1k": NAT, "height": NAT})
COMPLETION = obj({
    "completion_id": H32, "status": names(CompletionStatus), "height": NAT, "gateway": H32, "session_id": H32,
    "worker": H32, "model": H32, "prompt_hash": H32, "output_hash": H32, "fingerprint": HEX, "prompt_tokens": NAT,
    "completion_tokens": NAT, "cost_msat": NAT, "sampling": names(Sampling, lower=True), "seed": NAT,
    "temperature_milli": NAT, "split_bp": obj({"worker": NAT, "verifier": NAT, "treasury": NAT}),
    "verifier": H32, "worker_sig": HEX, "session_units_after": NAT, "draw_seed": HEX, "audit_positions": arr(NAT),
    "paid_sat": obj({"worker": NAT, "verifier": NAT, "treasury": NAT, "burned": NAT}),
    "challenge": null(obj({"challenger": H32, "height": NAT, "loser": names(Loser, lower=True), "referee": H32,
                           "slash_sat": NAT, "key": HEX, "value": HEX, "proof": HEX, "state_root": H32})),
    **PROVEN})
COMPONENTS = {"Error": ERROR, "Txid": TXID, "Transaction": TX, "Anchor": ANCHOR, "Worker": WORKER, "Task": TASK,
              "FlJob": FL_JOB}


# -- responses and parameters ----------------------------------------------------------------------------------
def json_(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def binary(description: str) -> Schema:
    return {"description": description, "content": {"application/octet-stream": {"schema": BINARY}}}


def text(media: str, description: str) -> Schema:
    return {"description": description, "content": {media: {"schema": STR}}}


def path(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "path", "required": True, "schema": schema, "description": description}


def query(name: str, schema: Schema, description: str) -> Schema:
    return {"name": name, "in": "query", "required": False, "schema": schema, "description": description}


def id_param(name: str, what: str) -> Schema:
    return path(name, hex_in(32), f"{what}: 64 hex characters (either case)")


def json_body(schema: Schema, required: bool = True) -> Schema:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


EMPTY_BODY = json_body({"type": "object", "description": "ignored; the body may also be empty"}, required=False)
RETRY_AFTER = {"Retry-After": {"required": True, "description": "seconds to wait before trying again",
                               "schema": {"type": "integer", "minimum": 1}}}
ERRORS = {  # the default description of each error status
    400: "bad input (`error` names what was wrong: malformed, missing-field, bad-field, out-of-range, or the "
         "admission's rejection reason); nothing changed",
    401: "an admin route without `Authorization: Bearer <api.admin_token>`, or with a wrong token (or none is "
         "configured: api.admin_token = \"\" turns the admin routes off)",
    403: "forbidden", 404: "not found", 409: "conflict",
    413: "body larger than api.max_body_bytes", 415: "a non-empty body that is not application/json",
    429: "rate-limited (api.rate_limit_per_s): retry after Retry-After seconds; nothing was done",
    503: "disk-low: the data dir's free space is below store.min_free_bytes; the node refuses new transactions "
         "for now (retry after Retry-After seconds)",
}


def error(status: int, description: str = "") -> Schema:
    r = json_(ref("Error"), description or ERRORS[status])
    if status == 401:
        r["headers"] = {"WWW-Authenticate": {"required": True, "schema": {"type": "string", "pattern": "^Bearer "}}}
    elif status in (429, 503):
        r["headers"] = RETRY_AFTER
    return r


# -- operations ------------------------------------------------------------------------------------------------
Operation = tuple[str, str, Schema]  # method, path, operation object


def op(method: str, route: str, tag: str, summary: str, ok: Mapping[int, Schema], *, params: Iterable[Schema] = (),
       body: Optional[Schema] = None, errors: Optional[Mapping[int, str]] = None, admin: bool = False,
       admits: bool = False) -> Operation:
    """One operation: its success responses, the errors its handler raises (status -> description, "" for the
    default), and those that follow from what it is (admin, reads a body, admits a transaction, rate-limited)."""
    responses: dict[int, Schema] = {**ok}
    errs = dict(errors or {})
    if admin:
        errs.setdefault(401, "")
    if body is not None:
        errs.setdefault(413, "")
        if "application/json" in body["content"]:
            errs.setdefault(415, "")
            errs.setdefault(400, "")
    if admits:
        errs.setdefault(400, "")
        errs.setdefault(503, "")
    if method != "get" or route in EXPENSIVE_GETS:
        errs.setdefault(429, "")
    for status, description in errs.items():
        responses[status] = error(status, description)
    o: Schema = {"operationId": _operation_id(method, route), "tags": [tag], "summary": summary,
                 "responses": {str(s): responses[s] for s in sorted(responses)}}
    params = list(params)
    if params:
        o["parameters"] = params
    if body is not None:
        o["requestBody"] = body
    if admin:
        o["security"] = [{"adminToken": []}]
    return method, route, o


def _operation_id(method: str, route: str) -> str:
    words = [w.strip("{}").replace("-", "_").replace(".", "_") for w in route.split("/") if w]
    return "_".join([method, *(words or ["root"])])


def _ledger() -> list[Operation]:
    height = path("height", uint(), "block height")
    return [
        op("get", "/health", "ledger", "Liveness: the process answers",
           {200: json_(obj({"ok": {"const": True}}), "up")}),
        op("get", "/api/status", "ledger", "Network, tip, final height, mempool size, uptime, version",
           {200: json_(obj({"network": STR, "height": NAT, "tip_hash": H32, "final_height": NAT, "state_root": H32,
                            "mempool_size": NAT, "uptime_s": NUM, "version": STR}), "the node's status")}),
        op("get", "/api/l2/state", "ledger", "Tip, record count and supply from one consistent read",
           {200: json_(obj({"height": NAT, "tip_hash": H32, "state_root": H32, "records": NAT, "supply": SUPPLY}),
                       "the state")}),
        op("get", "/api/l2/accounts/{id}", "ledger", "An account's balance and nonce with a state proof",
           {200: json_(obj({"account": H32, "exists": BOOL, "balance_sat": NAT, "nonce": NAT, "height": NAT,
                            "state_root": H32, "key": HEX, "proof": HEX}),
                       "the account (balance 0, exists false, and a non-inclusion proof if it has none)")},
           params=[id_param("id", "the account's x-only public key")], errors={400: ""}),
        op("get", "/api/l2/blocks/{height}", "ledger", "A block with its transactions, commit and finality",
           {200: json_(obj({"height": NAT, "hash": H32, "prev_hash": H32, "timestamp_ms": NAT, "tx_count": NAT,
                            "tx_root": H32, "state_root": H32, "txs": arr(ref("Transaction")), "raw": HEX,
                            "final": BOOL, "commit": null(obj({"signers": arr(NAT), "threshold": NAT, "raw": HEX}))}),
                       "the block")},
           params=[height], errors={400: "", 404: "no block at this height"}),
        op("get", "/api/l2/tx/{txid}", "ledger", "A transaction's status: committed, pending or dropped",
           {200: json_(obj({"txid": H32, "status": {"enum": ["committed", "pending", "dropped"]}},
                           {"height": NAT, "index": NAT, "reason": STR}), "its status"),
            404: json_({"allOf": [ref("Error"), obj({"txid": H32, "status": {"const": "unknown"}})]},
                       "a transaction this node never accepted, or whose drop it has forgotten")},
           params=[id_param("txid", "the transaction id")], errors={400: ""}),
        op("post", "/api/l2/tx", "ledger", "Submit a signed transaction",
           {202: json_(ref("Txid"), "admitted to the mempool")},
           body=json_body(obj({"tx": hex_in(max_bytes=MAX_TX_SIZE)})), admits=True),
        op("post", "/api/l2/txs", "ledger", "Submit a batch of signed transactions, each admitted or refused alone",
           {200: json_(obj({"results": arr({"anyOf": [obj({"txid": H32, "status": {"const": "pending"}}),
                                                      obj({"txid": H32, "error": ERROR["properties"]["error"],
                                                           "message": STR})]})}),
                       "one result per transaction, in order: admitted (pending), or its rejection reason")},
           body={"required": True, "content": {
               "application/json": {"schema": obj({"txs": arr(hex_in(max_bytes=MAX_TX_SIZE), minItems=1,
                                                              maxItems=MAX_BATCH)})},
               "application/octet-stream": {"schema": {**BINARY, "description": "each transaction as `length u32 "
                                                       "big-endian | its bytes` (l2d/txbatch.py)"}}}},
           errors={400: "not a batch (malformed, empty, or more than MAX_BATCH transactions); nothing admitted"},
           admits=True),
        op("get", "/metrics", "ledger", "Prometheus metrics", {200: text("text/plain", "Prometheus text format")}),
        op("post", "/api/admin/mint", "admin", "Mint (networks with admin minting: local, regtest)",
           {202: json_(ref("Txid"), "the mint transaction, admitted")},
           body=json_body(obj({"recipient": hex_in(32), "amount_sat": uint(MAX_MONEY, 1)})),
           errors={403: "minting is not allowed on this network"}, admin=True, admits=True),
        op("post", "/api/admin/snapshot", "admin", "Write a snapshot of the committed tip now",
           {200: json_(obj({"name": STR, "height": NAT, "state_root": H32, "block_hash": H32, "size": NAT}),
                       "the snapshot written")},
           body=EMPTY_BODY, errors={409: "the directory holds another chain's snapshot at this height"}, admin=True),
        op("get", "/api/admin/snapshots", "admin", "The snapshot files", {200: json_(obj({
            "snapshots": arr(obj({"name": STR, "height": NAT, "size": NAT}))}), "names, heights and sizes")},
           admin=True),
        op("get", "/api/admin/snapshots/{name}", "admin", "One snapshot file (docs/snapshot-format.md)",
           {200: binary("the snapshot file")}, params=[path("name", STR, "a name GET /api/admin/snapshots lists")],
           errors={404: "no such snapshot"}, admin=True),
    ]


def _federation() -> list[Operation]:
    return [
        op("get", "/api/federation", "federation", "Members, threshold, this member, rounds, final height",
           {200: json_(obj({
               "threshold": NAT, "n": NAT, "me": NAT, "height": NAT, "round": NAT, "proposer": NAT,
               "final_height": null(NAT), "evidence": NAT,
               "members": arr(obj({"index": NAT, "id": STR, "key": H32, "url": STR, "last_seen_s_ago": null(NUM)}))}),
               "this member's view")}),
        op("get", "/api/federation/evidence", "federation", "Equivocations this member saw", {200: json_(obj({
            "evidence": arr(obj({"member": NAT, "height": NAT, "round": NAT, "first": HEX, "second": HEX}))}),
            "both signed proposals of each")}),
        op("get", "/api/l2/commits", "federation", "The chain file of blocks from..to (docs/federation.md)",
           {200: binary("the chain file: headers and commits, what `l2-verify chain` checks")},
           params=[query("from", uint(), "first height (default 0)"),
                   query("to", uint(), f"last height (default: the tip, at most {MAX_COMMITS} blocks)")],
           errors={400: f"not an integer, or more than {MAX_COMMITS} blocks", 404: "no blocks in from..to"}),
    ]


def _anchors() -> list[Operation]:
    off = "anchoring is not enabled on this node"
    return [
        op("get", "/api/anchors", "anchors", "Every anchor with its Bitcoin and L2 status",
           {200: json_(obj({"broadcasting": BOOL, "mode": STR, "every_blocks": NAT, "btc_tip_height": null(NAT),
                            "anchors": arr(ref("Anchor"))}), "the anchors")},
           params=[query("status", any_case(m.value for m in AnchorState), "only those with this status")],
           errors={400: "not a status", 404: off}),
        op("get", "/api/anchors/latest", "anchors", "The anchor of the highest L2 height",
           {200: json_(ref("Anchor"), "the anchor")}, errors={404: off + ", or no anchor yet"}),
        op("get", "/api/anchors/{l2_height}/audit", "anchors", "The audit bundle of a confirmed anchor",
           {200: binary("the audit bundle (docs/audit-bundle.md), for `l2-verify audit`")},
           params=[path("l2_height", uint(), "the anchored L2 height")],
           errors={400: "", 404: off + ", no bitcoind, or no confirmed anchor at this height"}),
    ]


def _bridge() -> list[Operation]:
    off = "this node runs no bridge ([bridge] enabled = false)"
    btc_tip = null(obj({"base_height": NAT, "height": NAT, "hash": H32}))
    plan = obj({
        "id": H32, "kind": {"enum": ["payout", "anchor", "roll"]}, "status": names(PlanStatus), "l2_height": NAT,
        "final": BOOL, "replaces": null(H32), "replaced_by": null(H32), "anchor_height": NAT, "feerate_sat_vb": NAT,
        "fee_sat": NAT, "change_sat": NAT,
        "inputs": arr(obj({"txid": H32, "vout": NAT, "amount_sat": NAT, "kind": names(CoinKind)})),
        "pegouts": arr(obj({"id": H32, "payout_sat": NAT, "address": STR})), "threshold": NAT,
        "signed_by": arr(hex_out(33)), "psbt": null(STR), "signed_tx": null(HEX)})
    return [
        op("get", "/api/bridge/federation", "bridge", "Keys, threshold, deposit rule, Bitcoin tip, books, invariant",
           {200: json_(obj({
               "threshold": NAT, "keys": arr(hex_out(33)), "pegin_min_depth": NAT, "deposit_descriptor": null(STR),
               "emergency": null(obj({"threshold": NAT, "keys": arr(hex_out(33)), "delay_blocks": NAT})),
               "deposit_tweak": STR, "change_address": STR, "funding_address": STR, "funded_sat": NAT,
               "btc_tip": btc_tip, "pegged_in_sat": NAT, "pending_pegouts_sat": NAT, "paid_out_sat": NAT,
               "l2_supply_sat": INT, "bridged_supply_sat": INT, "holdings_sat": NAT, "invariant_ok": BOOL,
               "halted": null(STR)}), "the federation and its books")}, errors={404: off}),
        op("get", "/api/bridge/pegin-address/{account}", "bridge", "The deposit address only this account can claim",
           {200: json_(obj({"account": H32, "address": STR, "script_pubkey": HEX, "witness_script": HEX,
                            "descriptor": STR, "min_depth": NAT}), "the deposit address")},
           params=[id_param("account", "the L2 account")], errors={400: "", 404: off}),
        op("get", "/api/bridge/pegins", "bridge", "Claimed deposits", {200: json_(obj({"pegins": arr(obj({
            "btc_txid": H32, "vout": NAT, "amount_sat": NAT, "btc_height": NAT, "recipient": H32}))}), "the deposits")},
           errors={404: off}),
        op("get", "/api/bridge/pegouts", "bridge", "Peg-outs and where each payment stands",
           {200: json_(obj({"pegouts": arr(obj({"id": H32, "status": names(PegoutStatus), "amount_sat": NAT,
                                                "l2_height": NAT, "address": STR, "btc_txid": null(H32),
                                                "paid_sat": {**null(NAT), "description": "once COMPLETED: what its "
                                                             "Bitcoin output paid, amount_sat less its fee share"},
                                                "fee_share_sat": {**null(NAT), "description": "once COMPLETED: its "
                                                                  "equal share of the payout transaction's fee"}}))}),
                       "the peg-outs")}, errors={404: off}),
        op("get", "/api/bridge/coins", "bridge", "The federation's coins and the plan spending each",
           {200: json_(obj({"coins": arr(obj({"txid": H32, "vout": NAT, "amount_sat": NAT, "kind": names(CoinKind),
                                              "contract": H32, "address": STR, "spent_by": null(H32)}))}),
                       "the coins")}, errors={404: off}),
        op("get", "/api/bridge/plans", "bridge", "The federation's Bitcoin transaction plans, newest first",
           {200: json_(obj({"plans": arr(plan)}), "the plans")},
           params=[query("status", names(PlanStatus), "only those with this status"),
                   query("limit", uint(PLANS_MAX, 1), "at most this many (default 50)")],
           errors={400: "", 404: off}),
        op("post", "/api/admin/bridge/fund", "admin", "Record a deposit to the funding address as a federation coin",
           {202: json_(ref("Txid"), "the FederationFund transaction, admitted")},
           body=json_body(obj({"btc_height": uint(U32), "vout": uint(U32),
                               "tx": hex_in(max_bytes=MAX_CLAIM_TX, min_bytes=1),
                               "proof": hex_in(max_bytes=MAX_MERKLE_BLOCK, min_bytes=BTC_HEADER_SIZE + 1)})),
           errors={404: off}, admin=True, admits=True),
        op("get", "/api/bridge/headers", "bridge", "The header store's best chain as a header file",
           {200: binary("the header file (docs/header-file.md), for `l2-verify headers`")},
           params=[query("from", uint(), "first height"), query("to", uint(), "last height")],
           errors={400: "", 404: off + ", or it follows no bitcoind (no header store)"}),
    ]


def _work() -> list[Operation]:
    return [
        op("post", "/api/orchestration/submit", "work", "Submit a signed TASK_SUBMIT transaction",
           {202: json_(obj({"task_id": H32, "txid": H32}), "admitted; the task id is the txid")},
           body=json_body(obj({"tx": hex_in(max_bytes=MAX_TX_SIZE)})), admits=True),
        op("get", "/api/orchestration/tasks", "work", "Every task of the committed state, oldest first",
           {200: json_(obj({"height": NAT, "tasks": arr(ref("Task"))}), "the tasks")},
           params=[query("status", any_case(TaskStatus.__members__), "only those with this status")],
           errors={400: "not a status"}),
        op("get", "/api/orchestration/tasks/{id}", "work", "A task with the coordinator's explanation",
           {200: json_({"allOf": [ref("Task"), obj({"explanation": arr({}), "events": arr({}), "running": BOOL})]},
                       "the task")},
           params=[id_param("id", "the task id")], errors={400: "", 404: "no such task (it may still be pending)"}),
        op("get", "/api/orchestration/workers", "work", "The worker registry with live probe figures",
           {200: json_(obj({"height": NAT, "workers": arr(ref("Worker"))}), "the workers")}),
        op("get", "/api/orchestration/workers/{id}/assignments", "work", "Tasks whose result is due from a worker",
           {200: json_(obj({"height": NAT, "assignments": arr(obj({
               "task_id": H32, "role": names(Role, lower=True), "model": STR, "input": HEX,
               "deadline_height": NAT}))}),
               "the assignments")},
           params=[id_param("id", "the worker's key")], errors={400: "", 404: "no such worker"}),
    ]


def _fl() -> list[Operation]:
    job = id_param("id", "the FL job id")
    no_job = "no such FL job (it may still be pending)"
    round_body = obj({
        "round": uint(U16, 1), "params_hash": hex_in(32), "prev_params_hash": hex_in(32),
        "accuracy_ppm": uint(PPM), "loss_ppm": uint(), "update_bytes": uint(), "dp_epsilon_ppm": uint(),
        "participants": arr(obj({"key": hex_in(32), "num_examples": uint(U32), "accepted": BOOL}),
                            minItems=1, maxItems=MAX_PARTICIPANTS)})
    return [
        op("get", "/api/fl/jobs", "fl", "Every FL job, oldest first",
           {200: json_(obj({"height": NAT, "jobs": arr(ref("FlJob"))}), "the jobs")}),
        op("get", "/api/fl/jobs/{id}", "fl", "An FL job with its rounds and rewards",
           {200: json_({"allOf": [ref("FlJob"), obj({"height": NAT, "rounds_detail": arr(FL_ROUND),
                                                     "rewards": REWARDS, "rewards_final": BOOL,
                                                     "final_model": null(H32)})]}, "the job")},
           params=[job], errors={400: "", 404: no_job}),
        op("post", "/api/fl/jobs/{id}/rounds", "admin", "Commit an FL round (the model must be uploaded first)",
           {202: json_(ref("Txid"), "the FL_ROUND transaction, admitted")}, params=[job], body=json_body(round_body),
           errors={409: "the model params_hash names was not uploaded (PUT /api/fl/models)"}, admin=True, admits=True),
        op("get", "/api/fl/jobs/{id}/rounds/{n}", "fl", "A round commitment with its state proof",
           {200: json_(obj({"job_id": H32, "round": NAT, "height": NAT, "params_hash": H32, **PROVEN}), "the round")},
           params=[job, path("n", uint(U16, 1), "the round number")], errors={400: "", 404: "no such round"}),
        op("post", "/api/fl/jobs/{id}/finish", "admin", "Close an FL job, paying the contribution split",
           {202: json_(obj({"txid": H32, "rewards": REWARDS}), "the FL_FINISH transaction, admitted")},
           params=[job], body=EMPTY_BODY, errors={404: no_job}, admin=True, admits=True),
        op("get", "/api/fl/models/{hash}", "fl", "A model's canonical parameter bytes",
           {200: binary("bytes whose SHA-256 is hash")}, params=[id_param("hash", "the SHA-256 of the bytes")],
           errors={400: "", 404: "no such model",
                   500: "corrupt: the stored file does not hash to its name (never served)"}),
        op("put", "/api/fl/models", "admin", "Upload a model's parameter bytes",
           {201: json_(obj({"params_hash": H32, "size": uint(lo=1)}), "stored under its SHA-256")},
           body={"required": True, "content": {"application/octet-stream": {"schema": BINARY}}},
           errors={400: "empty body"}, admin=True),
    ]


def _others() -> list[Operation]:
    relay = obj({
        "identity": H32, "status": names(RelayStatus), "stake_sat": NAT, "x25519_key": H32, "operator": H32,
        "flags": NAT, "entry": BOOL, "exit": BOOL, "endpoint": STR, "rate_kib_s": NAT, "price_msat_per_mib": NAT,
        "measured_kib_s": NAT, "success_ppm": NAT, "weight": NAT, "measured_height": NAT, "last_heartbeat": NAT,
        "registered_height": NAT, "exit_height": null(NAT)})
    listed = obj({**relay["properties"], "last_heartbeat_ms": NAT, "heartbeat_age_ms": NAT, "votes": arr(obj({
        "member": H32, "epoch": NAT, "measured_kib_s": NAT, "success_ppm": NAT}))})
    session = obj({
        "session_id": H32, "status": names(SessionStatus), "client": H32, "server": H32, "session_key": HEX,
        "deposit_sat": NAT, "price_msat": NAT, "unit": NAT, "expiry_height": NAT, "open_height": NAT,
        "settled": obj({"seq": NAT, "amount_sat": NAT, "units": NAT, "receipt_id": null(H32)}), "escrow_sat": NAT,
        "refunded_sat": NAT, "close_height": null(NAT), **PROVEN})
    model = obj({"weights_sha256": H32, "name": STR, "version": STR, "format": names(ModelFormat, lower=True),
                 "context_length": NAT, "registrant": H32, "height": NAT, "offers": arr(OFFER)})
    return [
        op("get", "/api/sessions/{id}", "sessions", "A paid session's record with its state proof",
           {200: json_(session, "the session")}, params=[id_param("id", "the session id")],
           errors={400: "", 404: "no such session (its opening may still be pending)"}),
        op("get", "/api/netflow/relays", "netflow", "Every registered relay with its measured weight",
           {200: json_(obj({"height": NAT, "relays": arr(listed)}), "the relays")}),
        op("get", "/api/netflow/sessions/{id}", "netflow", "A NetFlow session (its server a relay) and that relay",
           {200: json_(obj({**session["properties"], "relay": relay}), "the session and its relay")},
           params=[id_param("id", "the session id")],
           errors={400: "", 404: "no such session, or its server is not a registered relay"}),
        op("get", "/api/models", "models", "Registered models with the offers of ACTIVE workers",
           {200: json_(obj({"height": NAT, "models": arr(model)}), "the models")}),
        op("get", "/api/completions/{id}", "models", "A recorded completion with its proof, audit draw, challenge",
           {200: json_(COMPLETION, "the completion")}, params=[id_param("id", "the recording txid")],
           errors={400: "", 404: "no such completion (its recording may still be pending)"}),
        op("get", OPENAPI_PATH, "meta", "This document", {200: json_(obj({
            "openapi": {"const": "3.1.0"}, "info": obj({"title": STR, "version": STR}), "paths": {"type": "object"},
            "components": {"type": "object"}}), "the OpenAPI 3.1 document")}),
    ]


def _dashboard() -> list[Operation]:
    counts = {"type": "object", "additionalProperties": NAT}
    sat = NAT
    snapshot = obj({
        "height": NAT, "tip_hash": H32, "state_root": H32, "final_height": NAT, "tip_timestamp_ms": NAT,
        "network": STR, "version": STR, "generated_ms": NAT,
        "status": obj({"state": {"enum": ["READY", "SYNCING", "DEGRADED"]}, "reasons": arr(STR), "notes": arr(STR)}),
        "blocks": arr(obj({"height": NAT, "hash": H32, "tx_count": NAT, "timestamp_ms": NAT, "bytes": NAT,
                           "signers": NAT, "final": BOOL, "href": STR}), maxItems=16),
        "mempool": obj({"size": NAT}),
        "supply": obj({"minted_sat": sat, "burned_sat": sat, "fees_sat": sat, "records": NAT}),
        "federation": obj({"threshold": NAT, "n": NAT, "me": NAT, "height": NAT, "round": NAT, "evidence": NAT,
                           "behind": BOOL, "catching_up_from": arr(NAT),
                           "members": arr(obj({"index": NAT, "id": STR, "key": H32, "evidence": NAT,
                                               "height": {"type": ["integer", "null"]},
                                               "last_seen_s_ago": {"type": ["number", "null"]}}))}),
        "node": obj({"uptime_s": NUM, "rounds": counts, "txs_accepted": NAT, "blocks_committed": NAT}),
        "anchors": obj({"enabled": BOOL}, {"counts": counts, "next_in_blocks": NAT, "latest": arr(obj(
            {"l2_height": NAT, "status": names(AnchorState)}))}),
        "bridge": {"anyOf": [NULL, obj({"pegged_in_sat": sat, "pending_pegouts_sat": sat, "paid_out_sat": sat,
                                        "holdings_sat": sat, "invariant_ok": BOOL})]},
        "work": obj({"workers": counts, "tasks": counts, "outcomes": counts, "stake_sat": sat, "slashes": NAT,
                     "disputes_open": NAT}),
        "fl": obj({"jobs": counts, "latest": arr(obj({"job_id": H32, "status": names(JobStatus), "rounds_done": NAT,
                                                      "accuracy": arr(obj({"round": NAT, "accuracy_ppm": NAT}))}))}),
        "netflow": obj({"relays": arr(obj({"identity": H32, "status": names(RelayStatus), "weight": NAT})),
                        "sessions": counts, "escrow_sat": sat, "settled_sat": sat}),
        "gateway": obj({"completions": counts, "tokens_in": NAT, "tokens_out": NAT, "cost_msat": NAT,
                        "paid": obj({"worker_sat": sat, "verifier_sat": sat, "treasury_sat": sat, "burned_sat": sat}),
                        "challenges": counts}),
    }, description="one snapshot of the node, every ledger figure at one height (layout: docs/dashboard.md)")
    return [
        op("get", "/", "dashboard", "The operator's dashboard page", {200: text("text/html", "the page")}),
        op("get", "/dashboard", "dashboard", "The operator's dashboard page", {200: text("text/html", "the page")}),
        op("get", "/api/dashboard", "dashboard", "What the dashboard shows", {200: json_(snapshot, "a snapshot")}),
        op("get", "/api/dashboard/events", "dashboard", "The dashboard's live feed (server-sent events)",
           {200: {"description": "`event: snapshot` with a snapshot's JSON after every block and at least every few "
                                 "seconds, until the client leaves",
                  "content": {"text/event-stream": {"schema": obj({
                      "event": {"const": "snapshot"},
                      "data": {"type": "string", "contentMediaType": "application/json",
                               "contentSchema": snapshot}})}}}}),
    ]


def operations() -> list[Operation]:
    """Every operation of the REST API."""
    return [*_ledger(), *_federation(), *_anchors(), *_bridge(), *_work(), *_fl(), *_others(), *_dashboard()]


@functools.cache
def spec() -> dict[str, Any]:
    """The OpenAPI 3.1 document (built once; treat it as read-only)."""
    paths: dict[str, dict[str, Schema]] = {}
    for method, route, o in operations():
        if method in paths.setdefault(route, {}):
            raise ValueError(f"two operations {method.upper()} {route}")
        paths[route][method] = o
    return {
        "openapi": "3.1.0",
        "info": {"title": "l2d REST API", "version": __version__,
                 "description": "The daemon's REST API (README.md, \"Operator\"). Every error is a JSON Error body. "
                                f"Not here: {MEMBER_ROUTES_NOTE}."},
        "paths": paths,
        "components": {
            "schemas": COMPONENTS,
            "securitySchemes": {"adminToken": {"type": "http", "scheme": "bearer",
                                               "description": "the node's api.admin_token"}},
        },
    }


async def openapi_json(request: web.Request) -> web.Response:
    """GET /api/openapi.json: this API's OpenAPI 3.1 document."""
    return web.json_response(spec())


def add_routes(r: web.UrlDispatcher) -> None:
    r.add_get(OPENAPI_PATH, openapi_json)
