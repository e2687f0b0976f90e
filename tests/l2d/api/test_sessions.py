"""GET /api/sessions/{id} on a real in-process node: a session opened, settled and closed through POST /api/l2/tx,
read back with a state proof that checks against the root it names; a stale receipt answers 400 stale-receipt and
changes nothing; unknown and malformed ids answer 404 and 400."""
from __future__ import annotations

import hashlib
from typing import Any

from coincurve import PrivateKey

from l2d.core.params import LOCAL
from l2d.core.session import SessionRecord, session_key
from l2d.core.session_tx import Receipt, SessionClose, SessionOpen, SessionSettle
from l2d.core.tree import Proof, verify_proof
from l2d.core.tx import sign
from tests.l2d.api.test_ledger import Client, expect_error, get_json, post_tx, pubkey, secret, wait_committed

CLIENT, SERVER = 1, 2
SESSION_SECRET = hashlib.sha256(b"l2d api session key").digest()


async def nonce(c: Client, n: int) -> int:
    return int((await get_json(c, f"/api/l2/accounts/{pubkey(n).hex()}"))["nonce"])


async def send(c: Client, wait_until: Any, n: int, payload: Any) -> str:
    t = sign(LOCAL, secret(n), await nonce(c, n), 1, payload, b"\0" * 32)
    await post_tx(c, t)
    await wait_committed(c, wait_until, t.txid.hex())
    return t.txid.hex()


async def session(c: Client, sid: str) -> dict[str, Any]:
    s: dict[str, Any] = await get_json(c, f"/api/sessions/{sid}")
    proof = Proof.decode(bytes.fromhex(s["proof"]))
    assert proof.key == session_key(bytes.fromhex(sid)) and s["key"] == proof.key.hex()
    value = verify_proof(bytes.fromhex(s["state_root"]), proof)
    assert value is not None and value.hex() == s["value"]
    rec = SessionRecord.decode(value)
    assert (rec.status.name, rec.settled_sat, rec.seq) == (s["status"], s["settled"]["amount_sat"], s["settled"]["seq"])
    return s


async def test_a_session_read_back_with_its_proof_through_open_settle_and_close(client: Client,
                                                                                 wait_until: Any) -> None:
    c = client
    tip = (await get_json(c, "/api/status"))["height"]
    key = PrivateKey(SESSION_SECRET).public_key_xonly.format()
    sid = await send(c, wait_until, CLIENT, SessionOpen(pubkey(SERVER), key, 50_000, 1000, 1, tip + 1000))
    s = await session(c, sid)
    assert (s["status"], s["client"], s["server"], s["session_key"]) == ("OPEN", pubkey(CLIENT).hex(),
                                                                       pubkey(SERVER).hex(), key.hex())
    assert s["deposit_sat"] == s["escrow_sat"] == 50_000 and s["settled"]["receipt_id"] is None
    r2 = Receipt.sign(LOCAL.id, PrivateKey(SESSION_SECRET), bytes.fromhex(sid), 2, 700, 700)
    await send(c, wait_until, SERVER, SessionSettle(r2))
    s = await session(c, sid)
    assert s["settled"] == {"seq": 2, "amount_sat": 700, "units": 700, "receipt_id": r2.receipt_id.hex()}
    assert s["escrow_sat"] == 49_300
    stale = sign(LOCAL, secret(SERVER), await nonce(c, SERVER), 1,
                 SessionSettle(Receipt.sign(LOCAL.id, PrivateKey(SESSION_SECRET), bytes.fromhex(sid), 1, 300, 300)),
                 b"\0" * 32)
    body = await expect_error(c, "POST", "/api/l2/tx", 400, "stale-receipt", json={"tx": stale.raw.hex()})
    assert "not above the settled seq 2" in body["message"]
    await send(c, wait_until, SERVER, SessionClose(bytes.fromhex(sid)))
    s = await session(c, sid)
    assert (s["status"], s["escrow_sat"], s["refunded_sat"]) == ("CLOSED", 0, 49_300) and s["close_height"]


async def test_unknown_and_malformed_session_ids(client: Client) -> None:
    await expect_error(client, "GET", f"/api/sessions/{'ab' * 32}", 404, "not-found")
    await expect_error(client, "GET", "/api/sessions/xyz", 400, "malformed")
