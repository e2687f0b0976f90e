"""The NetFlow routes on a real in-process node: GET /api/netflow/relays gives each relay's heartbeat as the
timestamp of its block and an age by the node's clock (a heartbeat moves it on) and the member's vote its weight
comes from; GET /api/netflow/sessions/{id} gives a session whose server is a relay, with that relay's record, and 404
for a session with another server."""
from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Any

import pytest
from coincurve import PrivateKey

from l2d.config import Config
from l2d.core.params import LOCAL
from l2d.core.relay_tx import FLAG_ENTRY, FLAG_EXIT, Measurement, RelayHeartbeat, RelayRegister, RelayWeights
from l2d.core.session_tx import SessionOpen
from l2d.core.tx import sign
from tests.conftest import make_config
from tests.l2d.api.test_ledger import Client, expect_error, get_json, post_tx, pubkey, wait_committed
from tests.l2d.api.test_sessions import send, session

RELAY, CLIENT, OTHER = 2, 1, 3
SESSION_KEY = PrivateKey(hashlib.sha256(b"l2d api netflow session").digest()).public_key_xonly.format()
MEMBER = hashlib.sha256(b"l2d api netflow member").digest()


@pytest.fixture
def config(tmp_path: Path) -> Config:
    """The node's own (only) member key is MEMBER: the test posts its relay weights."""
    key = tmp_path / "member.key"
    key.write_text(MEMBER.hex())
    key.chmod(0o600)
    return make_config(tmp_path / "data", federation={"key_file": str(key)})


async def listed(c: Client) -> dict[str, Any]:
    relays = (await get_json(c, "/api/netflow/relays"))["relays"]
    assert [r["identity"] for r in relays] == [pubkey(RELAY).hex()]
    r: dict[str, Any] = relays[0]
    block = await get_json(c, f"/api/l2/blocks/{r['last_heartbeat']}")
    assert r["last_heartbeat_ms"] == block["timestamp_ms"]
    assert 0 <= r["heartbeat_age_ms"] <= int(time.time() * 1000) - r["last_heartbeat_ms"] + 5_000
    return r


async def test_relays_list_their_heartbeat_age_and_a_relay_session_reads_with_its_relay(client: Client,
                                                                                       wait_until: Any) -> None:
    c = client
    await send(c, wait_until, RELAY, RelayRegister(5_000, bytes(range(32)), pubkey(RELAY), FLAG_ENTRY | FLAG_EXIT,
                                                   1024, 1_000_000, b"127.0.0.1:9050"))
    registered = await listed(c)
    assert registered["last_heartbeat"] == registered["registered_height"]  # registering counts as a heartbeat
    await send(c, wait_until, RELAY, RelayHeartbeat())
    beat = await listed(c)
    assert beat["last_heartbeat"] > registered["last_heartbeat"]
    assert beat["last_heartbeat_ms"] >= registered["last_heartbeat_ms"] and beat["votes"] == []

    member = PrivateKey(MEMBER).public_key_xonly.format().hex()
    nonce = (await get_json(c, f"/api/l2/accounts/{member}"))["nonce"]
    weights = sign(LOCAL, MEMBER, nonce, 0, RelayWeights(beat["last_heartbeat"], (
        Measurement(pubkey(RELAY), 900, 500_000),)), b"\0" * 32)
    await post_tx(c, weights)
    await wait_committed(c, wait_until, weights.txid.hex())
    voted = await listed(c)
    assert voted["votes"] == [{"member": member, "epoch": beat["last_heartbeat"], "measured_kib_s": 900,
                               "success_ppm": 500_000}]
    assert voted["weight"] == 450  # one member: its vote decides

    tip = (await get_json(c, "/api/status"))["height"]
    sid = await send(c, wait_until, CLIENT, SessionOpen(pubkey(RELAY), SESSION_KEY, 10_000, 1_000_000, 1 << 20,
                                                        tip + 100))
    s = await get_json(c, f"/api/netflow/sessions/{sid}")
    assert {k: v for k, v in s.items() if k not in ("relay", "tip_height")} == \
        {k: v for k, v in (await session(c, sid)).items() if k != "tip_height"}  # as /api/sessions, proof and all
    assert s["relay"]["identity"] == pubkey(RELAY).hex() and s["relay"]["endpoint"] == "127.0.0.1:9050"
    other = await send(c, wait_until, CLIENT, SessionOpen(pubkey(OTHER), SESSION_KEY, 10_000, 1, 1, tip + 100))
    body = await expect_error(c, "GET", f"/api/netflow/sessions/{other}", 404, "not-found")
    assert "not a registered relay" in body["message"]
    await expect_error(c, "GET", f"/api/netflow/sessions/{'ab' * 32}", 404, "not-found")
    await expect_error(c, "GET", "/api/netflow/sessions/xyz", 400, "malformed")
