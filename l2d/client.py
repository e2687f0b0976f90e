"""The one client of the daemon's REST API: `Client` (urllib; l2-cli, l2-fl, the orchestration task client and the
Flower ServerApp's L2 recorder) and `AsyncClient` (aiohttp; l2-worker).

A refused request raises ApiError(status, code, message), parsed from the daemon's {"error": code, "message": text}
body. Failing to talk to the daemon at all (connection refused or reset, timeout) raises Unreachable, an ApiError
with status 0 whose message names the daemon's address and keeps the underlying exception in `error`.
"""
from __future__ import annotations

import asyncio
import hashlib
import http.client
import json
import os
import time
import urllib.error
import urllib.request
from types import TracebackType
from typing import Any, BinaryIO, Callable, Optional, Sequence

import aiohttp

from .core import tx as T
from .core.params import Network, network_by_name
from .core.payload import Payload
from .txbatch import batches, unanswered

NOT_JSON = "http-error"  # the code of an error answered with a body that is not the daemon's JSON


class ApiError(Exception):
    """The daemon refused a request (or a call could not complete, e.g. timed out waiting for a condition).

    str() is "STATUS CODE: MESSAGE"; `detail` is "CODE: MESSAGE", or the start of an error body that was not JSON.
    """

    def __init__(self, status: int, code: str, message: str, method: str = "", path: str = "",
                 detail: Optional[str] = None) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
        self.method, self.path = method, path
        self.detail = f"{code}: {message}" if detail is None else detail


class Unreachable(ApiError):
    """No answer from the daemon: connection refused or reset, DNS failure, timeout. `error` is the cause."""

    def __init__(self, url: str, method: str, path: str, error: BaseException) -> None:
        reason = error.reason if isinstance(error, urllib.error.URLError) else error
        self.url, self.error, self.reason = url, error, str(reason)
        super().__init__(0, "unreachable", f"cannot reach the daemon at {url}: {self.reason}", method, path)

    def __str__(self) -> str:
        return self.message


def error_from_body(status: int, body: bytes, method: str = "", path: str = "") -> ApiError:
    """The ApiError of an error answer: the daemon's JSON {"error", "message"}, else the start of the body."""
    try:
        d = json.loads(body)
    except ValueError:
        d = None
    if isinstance(d, dict):
        return ApiError(status, str(d.get("error")), str(d.get("message")), method, path)
    text = body.decode(errors="replace").strip()[:200]
    return ApiError(status, NOT_JSON, text, method, path, detail=text)


class _Base:
    def __init__(self, url: str, token: str = "", timeout: float = 30.0) -> None:
        # Several members' URLs, comma-separated: a request goes to the first that answers (failover).
        self.urls = [u.strip().rstrip("/") for u in url.split(",") if u.strip()] or [url]
        self.url = self.urls[0]
        self.token = token
        self.timeout = timeout

    def _encode(self, body: Any, data: Optional[bytes], admin: bool) -> tuple[Optional[bytes], dict[str, str]]:
        """The request body and headers: body (JSON) or data (raw bytes); admin adds the bearer token."""
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        elif data is not None:
            headers["Content-Type"] = "application/octet-stream"
        if admin:
            headers["Authorization"] = f"Bearer {self.token}"
        return data, headers

    @staticmethod
    def _sign(network: Network, secret: bytes, nonce: int, fee_sat: int, payload: Payload) -> T.Transaction:
        return T.sign(network, secret, nonce, fee_sat, payload, os.urandom(32))


class Client(_Base):
    """Synchronous client (urllib). Every call raises ApiError when refused, Unreachable when there is no answer."""

    def request(self, method: str, path: str, body: Any = None, *, data: Optional[bytes] = None, admin: bool = False,
                raw: bool = False, sink: Optional[Callable[[Any], Any]] = None) -> Any:
        """One request: body is sent as JSON, data as raw bytes; the answer is parsed JSON, or bytes when raw, or
        what sink(response) returns (it reads the response itself: a large answer is never held whole)."""
        data, headers = self._encode(body, data, admin)
        for i, url in enumerate(self.urls):
            req = urllib.request.Request(url + path, data=data, method=method, headers=headers)
            try:
                with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                    if sink is not None:  # no failover once the answer has started into the sink
                        try:
                            return sink(resp)
                        except (OSError, http.client.HTTPException) as e:
                            raise Unreachable(url, method, path, e) from e
                    payload = resp.read()
            except urllib.error.HTTPError as e:
                with e:
                    err = e.read()
                raise error_from_body(e.code, err, method, path) from None
            except (OSError, http.client.HTTPException) as e:  # URLError, a reset or timed-out read, a broken answer
                if i + 1 < len(self.urls):
                    continue  # the next member
                raise Unreachable(url, method, path, e) from e
            return payload if raw else json.loads(payload)
        raise AssertionError("unreachable: urls is never empty")

    def get(self, path: str) -> Any:
        return self.request("GET", path)

    def post(self, path: str, body: Any, *, admin: bool = False) -> Any:
        return self.request("POST", path, body, admin=admin)

    def wait(self, cond: Callable[[], Any], what: str, timeout: float = 60.0, poll: float = 0.1) -> Any:
        """Poll cond() until it returns something truthy (returned); ApiError 408 "timeout" after timeout."""
        end = time.monotonic() + timeout
        while True:
            v = cond()
            if v:
                return v
            if time.monotonic() > end:
                raise ApiError(408, "timeout", f"timed out after {timeout}s waiting for {what}")
            time.sleep(poll)

    # -- chain ---------------------------------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return self.get("/api/status")

    def network(self) -> Network:
        return network_by_name(str(self.status()["network"]))

    def account(self, account: str) -> dict[str, Any]:
        """Balance, nonce and state proof of an account (64 hex characters)."""
        return self.get(f"/api/l2/accounts/{account}")

    def block(self, height: int) -> dict[str, Any]:
        return self.get(f"/api/l2/blocks/{height}")

    def tx(self, txid: str) -> dict[str, Any]:
        """Status of a transaction: committed, pending or dropped."""
        return self.get(f"/api/l2/tx/{txid}")

    def anchors(self) -> dict[str, Any]:
        return self.get("/api/anchors")

    def latest_anchor(self) -> dict[str, Any]:
        """The anchor of the highest L2 height (ApiError 404 where anchoring is off or nothing is anchored yet)."""
        return self.get("/api/anchors/latest")

    def plans(self, status: Optional[str] = None, limit: int = 50) -> dict[str, Any]:
        """The federation's peg-out plans, newest first: transaction, PSBT, signers, status (GET /api/bridge/plans)."""
        return self.get(f"/api/bridge/plans?limit={limit}" + (f"&status={status}" if status else ""))

    def audit_bundle(self, l2_height: int) -> bytes:
        return self.request("GET", f"/api/anchors/{l2_height}/audit", raw=True)

    def submit_tx(self, raw: bytes) -> dict[str, Any]:
        """Submit a signed transaction; the answer is {"txid"} once the mempool admitted it."""
        return self.post("/api/l2/tx", {"tx": raw.hex()})

    def submit_txs(self, raws: Sequence[bytes]) -> list[dict[str, Any]]:
        """Submit signed transactions in batches (POST /api/l2/txs, binary; l2d/txbatch.py `batches`): one result per
        transaction, in order: {"txid", "status": "pending"} or {"txid", "error", "message"}. The ApiError (or
        Unreachable) of the first batch is raised: nothing was admitted; that of a later one is the result of its
        transactions (they may have been admitted if it got no answer) and of the ones after it ("not-sent"),
        so the results of the batches admitted before it are not lost."""
        out: list[dict[str, Any]] = []
        for part, body in batches(raws):
            try:
                out += self.request("POST", "/api/l2/txs", data=body)["results"]
            except ApiError as e:
                if not out:
                    raise
                return out + unanswered(part, raws[len(out) + len(part):], e.code, str(e))
        return out

    def sign(self, secret: bytes, payload: Payload, fee_sat: int, *, nonce: Optional[int] = None,
             network: Optional[Network] = None) -> T.Transaction:
        """Sign payload from secret's account: for the daemon's network and with the account's committed nonce
        unless given."""
        if network is None:
            network = self.network()
        if nonce is None:
            nonce = int(self.account(T.public_key(secret).hex())["nonce"])
        return self._sign(network, secret, nonce, fee_sat, payload)

    def sign_and_submit(self, secret: bytes, payload: Payload, fee_sat: int, *, nonce: Optional[int] = None,
                        network: Optional[Network] = None) -> dict[str, Any]:
        """sign() then submit_tx(): the answer is {"txid"}."""
        return self.submit_tx(self.sign(secret, payload, fee_sat, nonce=nonce, network=network).raw)

    def wait_tx(self, txid: str, timeout: float, poll: float = 0.1) -> dict[str, Any]:
        """Poll the transaction's status until it is committed; after timeout, the last status seen."""
        deadline = time.monotonic() + timeout
        while True:
            st = self.tx(txid)
            if st.get("status") == "committed" or time.monotonic() > deadline:
                return st
            time.sleep(poll)

    # -- bridge --------------------------------------------------------------------------------------------------
    def federation(self) -> dict[str, Any]:
        return self.get("/api/bridge/federation")

    def pegin_address(self, account: str) -> dict[str, Any]:
        return self.get(f"/api/bridge/pegin-address/{account}")

    # -- admin (the token) ---------------------------------------------------------------------------------------
    def mint(self, recipient: str, amount_sat: int) -> dict[str, Any]:
        return self.post("/api/admin/mint", {"recipient": recipient, "amount_sat": amount_sat}, admin=True)

    def fund(self, btc_height: int, vout: int, btc_tx: bytes, proof: bytes) -> dict[str, Any]:
        """The member behind this API records a deposit to the federation's funding address."""
        return self.post("/api/admin/bridge/fund", {"btc_height": btc_height, "vout": vout, "tx": btc_tx.hex(),
                                                    "proof": proof.hex()}, admin=True)

    def snapshot(self) -> dict[str, Any]:
        """Take a snapshot now; the answer names it."""
        return self.post("/api/admin/snapshot", {}, admin=True)

    def download_snapshot(self, name: str, out: BinaryIO, progress: Callable[[int, Optional[int]], None]) -> int:
        """Stream a snapshot file into out (admin), calling progress(bytes so far, total or None) after each MiB;
        returns its size. Snapshots grow with the state (hundreds of MB at millions of accounts): never held in
        memory whole."""
        def copy(resp: Any) -> int:
            total = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else None
            done = 0
            while chunk := resp.read(1 << 20):
                out.write(chunk)
                done += len(chunk)
                progress(done, total)
            return done
        return int(self.request("GET", f"/api/admin/snapshots/{name}", admin=True, sink=copy))

    def check_admin(self) -> None:
        """Raise ApiError 401 unless the token is the daemon's admin token (an empty model upload: refused as
        malformed once authorised, so nothing is stored)."""
        try:
            self.request("PUT", "/api/fl/models", data=b"", admin=True)
        except ApiError as e:
            if e.status != 400:
                raise

    # -- federated learning --------------------------------------------------------------------------------------
    def fl_job(self, job_id: str) -> dict[str, Any]:
        return dict(self.get(f"/api/fl/jobs/{job_id}"))

    def fl_job_or_none(self, job_id: str) -> Optional[dict[str, Any]]:
        try:
            return self.fl_job(job_id)
        except ApiError as e:
            if e.status == 404:
                return None
            raise

    def fl_round(self, job_id: str, body: dict[str, Any]) -> dict[str, Any]:
        """(admin) Commit a round: the daemon signs an FL_ROUND with the federation key."""
        return self.post(f"/api/fl/jobs/{job_id}/rounds", body, admin=True)

    def fl_finish(self, job_id: str) -> dict[str, Any]:
        """(admin) Close a job: the daemon signs an FL_FINISH with the ledger's contribution split."""
        return self.post(f"/api/fl/jobs/{job_id}/finish", {}, admin=True)

    def put_model(self, raw: bytes) -> str:
        """(admin) Store parameters in the content-addressed model store; returns their hash."""
        return str(self.request("PUT", "/api/fl/models", data=raw, admin=True)["params_hash"])

    def get_model(self, params_hash: str) -> bytes:
        """The parameters stored under params_hash, checked to hash to it (else ApiError "corrupt")."""
        raw: bytes = self.request("GET", f"/api/fl/models/{params_hash}", raw=True)
        if hashlib.sha256(raw).hexdigest() != params_hash:
            raise ApiError(200, "corrupt", f"model {params_hash} does not hash to its name")
        return raw

    # -- orchestration -------------------------------------------------------------------------------------------
    def task(self, task_id: str) -> dict[str, Any]:
        return self.get(f"/api/orchestration/tasks/{task_id}")

    def submit_task(self, raw: bytes) -> dict[str, Any]:
        """Submit a signed TASK_SUBMIT; the answer is {"task_id"}."""
        return self.post("/api/orchestration/submit", {"tx": raw.hex()})


class AsyncClient(_Base):
    """Asynchronous client (aiohttp), used as `async with AsyncClient(url) as c:` (one session for its calls).
    Every call raises ApiError when refused, Unreachable when there is no answer."""

    _session: Optional[aiohttp.ClientSession] = None

    async def __aenter__(self) -> AsyncClient:
        self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout))
        return self

    async def __aexit__(self, et: Optional[type[BaseException]], e: Optional[BaseException],
                        tb: Optional[TracebackType]) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            await session.close()

    async def request(self, method: str, path: str, body: Any = None, *, data: Optional[bytes] = None,
                      admin: bool = False, raw: bool = False) -> Any:
        """One request: body is sent as JSON, data as raw bytes; the answer is parsed JSON, or bytes when raw."""
        assert self._session is not None, "use the client as `async with AsyncClient(...)`"
        data, headers = self._encode(body, data, admin)
        try:
            async with self._session.request(method, self.url + path, data=data, headers=headers) as r:
                status, payload = r.status, await r.read()
        except (aiohttp.ClientError, asyncio.TimeoutError) as e:
            raise Unreachable(self.url, method, path, e) from e
        if not 200 <= status < 300:
            raise error_from_body(status, payload, method, path)
        return payload if raw else json.loads(payload)

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def post(self, path: str, body: Any, *, admin: bool = False) -> Any:
        return await self.request("POST", path, body, admin=admin)

    async def status(self) -> dict[str, Any]:
        return await self.get("/api/status")

    async def network(self) -> Network:
        return network_by_name(str((await self.status())["network"]))

    async def account(self, account: str) -> dict[str, Any]:
        return await self.get(f"/api/l2/accounts/{account}")

    async def tx(self, txid: str) -> dict[str, Any]:
        return await self.get(f"/api/l2/tx/{txid}")

    async def submit_tx(self, raw: bytes) -> dict[str, Any]:
        return await self.post("/api/l2/tx", {"tx": raw.hex()})

    async def submit_txs(self, raws: Sequence[bytes]) -> list[dict[str, Any]]:
        """Client.submit_txs."""
        out: list[dict[str, Any]] = []
        for part, body in batches(raws):
            try:
                out += (await self.request("POST", "/api/l2/txs", data=body))["results"]
            except ApiError as e:
                if not out:
                    raise
                return out + unanswered(part, raws[len(out) + len(part):], e.code, str(e))
        return out

    async def sign(self, secret: bytes, payload: Payload, fee_sat: int, *, nonce: Optional[int] = None,
                   network: Optional[Network] = None) -> T.Transaction:
        """As Client.sign."""
        if network is None:
            network = await self.network()
        if nonce is None:
            nonce = int((await self.account(T.public_key(secret).hex()))["nonce"])
        return self._sign(network, secret, nonce, fee_sat, payload)

    async def sign_and_submit(self, secret: bytes, payload: Payload, fee_sat: int, *, nonce: Optional[int] = None,
                              network: Optional[Network] = None) -> dict[str, Any]:
        """sign() then submit_tx(): the answer is {"txid"}."""
        return await self.submit_tx((await self.sign(secret, payload, fee_sat, nonce=nonce, network=network)).raw)

    async def wait_tx(self, txid: str, timeout: float, poll: float = 0.02) -> Optional[dict[str, Any]]:
        """Poll the transaction's status until it is committed or dropped (that status is returned); None if
        neither within timeout. An error answer (e.g. 404 before the daemon knows the txid) counts as no status
        yet; Unreachable is raised."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                st = await self.tx(txid)
            except Unreachable:
                raise
            except ApiError:
                st = {}
            if st.get("status") in ("committed", "dropped"):
                return st
            await asyncio.sleep(poll)
        return None

    # -- orchestration -------------------------------------------------------------------------------------------
    async def assignments(self, worker: str) -> dict[str, Any]:
        """A worker's assignments; ApiError 404 while the worker is not registered."""
        return await self.get(f"/api/orchestration/workers/{worker}/assignments")
