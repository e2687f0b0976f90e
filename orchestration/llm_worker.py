"""`l2-llm-worker`: a worker serving a registered language model over HTTP (docs/inference.md, "Workers").

It loads the model once (orchestration/llm.py), registers on the L2 as a worker (WorkerRegister with a stake, its
endpoint in the capabilities) and offers the model (ModelServe: context length, msat per 1k input and output
tokens), then serves

    POST /v1/generate  {"prompt": [token ids], "max_tokens": n, "seed": null | int, "temperature": float}

as newline-delimited JSON, one line per token as it is decoded, `{"token": id, "text": the new text, "top": [[the
top-4 ids], [their quantised logits]]}`, then
`{"done": true, "finish_reason": "stop" | "length", "tokens": n, "fingerprint": hex, "signature": hex}` (the Merkle
root over every position's token and top-4, and the worker key's BIP340 signature of the result: what a Completion
records);

    POST /v1/audit    {"completion_id": hex, "prompt": [ids], "output": [ids], "tops": [[[ids], [logits]], ...]}
    POST /v1/referee  {"completion_id": hex, "prompt": [ids], "output": [ids]}

a gateway's audit of another worker's recorded completion (the prompt and output must hash to the record, the top-K
make its fingerprint): this worker re-executes it teacher-forced and compares at the positions the record's draw
seed reveals -> `{"verdict": "match"}`, or `{"verdict": "mismatch", "reason", "challenge": its COMPLETION_CHALLENGE's
txid and status}`; and a challenged one's referee, whose re-execution the L2 judges (`{"referee": txid and status}`).
`GET /ping` answers the coordinator's latency probe. Decoding runs in one thread, one request at a time (the model is
one per process); the others wait.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Optional

from aiohttp import web

from l2d.aio import serve_app, until_signalled
from l2d.client import ApiError, AsyncClient
from l2d.core.model_tx import CompletionChallenge, CompletionReferee, fp_proof, fp_root, sign_result
from l2d.keys import load_secret
from l2d.logs import setup_logging

from .llm import LanguageModel, Mismatch, TopK, check_revealed, fingerprint, leaves, token_hash

log = logging.getLogger(__name__)

MAX_TOKENS = 1024
MODEL_NAME, MODEL_VERSION = b"SmolLM2-135M-Instruct", b"Q4_1"  # how the worker registers the model if nobody has


class Server:
    def __init__(self, lm: LanguageModel, secret: Optional[bytes] = None, network_id: int = 0,
                 api: Optional[AsyncClient] = None) -> None:
        """secret: the worker's L2 key, which signs each result and its audits (without one, results are unsigned
        and unauditable, and the worker audits nothing); api: the node it reads records from and submits to."""
        self.lm, self.secret, self.network_id, self.api = lm, secret, network_id, api
        self.model_hash = lm.weights_sha256
        self._lock = asyncio.Lock()
        self._submitting = asyncio.Lock()

    def sign(self, prompt: list[int], out: list[int], fp: bytes, seed: Optional[int], temperature: float) -> bytes:
        if self.secret is None:
            return bytes(64)
        return sign_result(self.secret, self.network_id, self.model_hash, token_hash(prompt), token_hash(out), fp,
                           len(prompt), len(out), int(seed is not None), seed or 0,
                           0 if seed is None else round(temperature * 1000), os.urandom(32))

    async def ping(self, request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def generate(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
            prompt = [int(x) for x in body["prompt"]]
            max_tokens = int(body.get("max_tokens", 256))
            seed = body.get("seed")
            temperature = float(body.get("temperature", 1.0))
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": f"malformed request: {e}"}, status=400)
        if not prompt or not 0 < max_tokens <= MAX_TOKENS or len(prompt) + max_tokens > self.lm.context_length:
            return web.json_response({"error": "prompt + max_tokens do not fit the context"}, status=400)
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        async with self._lock:
            loop = asyncio.get_running_loop()
            q: asyncio.Queue[Optional[tuple[int, TopK]]] = asyncio.Queue()
            stop = threading.Event()

            def run() -> None:
                try:
                    for item in self.lm.generate(prompt, max_tokens, None if seed is None else int(seed),
                                                 temperature):
                        if stop.is_set():
                            return
                        loop.call_soon_threadsafe(q.put_nowait, item)
                finally:
                    loop.call_soon_threadsafe(q.put_nowait, None)
            worker = loop.run_in_executor(None, run)
            out: list[int] = []
            tops: list[TopK] = []
            text = ""
            try:
                while (item := await q.get()) is not None:
                    tok, top = item
                    out.append(tok)
                    tops.append(top)
                    now = self.lm.decode(out)
                    delta, text = now[len(text):], now
                    await resp.write(json.dumps({"token": tok, "text": delta,
                                                 "top": [list(top.ids), list(top.logits)]}).encode() + b"\n")
                reason = "stop" if out and out[-1] == self.lm.eos else "length"
                fp = fingerprint(out, tops)
                sig = self.sign(prompt, out, fp, None if seed is None else int(seed), temperature)
                await resp.write(json.dumps({"done": True, "finish_reason": reason, "tokens": len(out),
                                             "fingerprint": fp.hex(), "signature": sig.hex()}).encode() + b"\n")
            finally:
                stop.set()
                with contextlib.suppress(Exception):
                    await worker
        return resp

    async def _recorded(self, request: web.Request, status: str) -> tuple[dict[str, Any], list[int], list[int]]:
        """The completion a request names, as the ledger recorded it (in `status`), with the prompt and output
        the request gives, which must hash to the recorded ones; 400 otherwise."""
        try:
            body = await request.json()
            cid = bytes.fromhex(body["completion_id"])
            prompt, output = [int(x) for x in body["prompt"]], [int(x) for x in body["output"]]
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPBadRequest(text=f"malformed request: {e}") from None
        if self.api is None or self.secret is None:
            raise web.HTTPServiceUnavailable(text="this worker has no L2 key: it does not audit")
        try:
            rec = await self.api.get(f"/api/completions/{cid.hex()}")
        except ApiError as e:
            raise web.HTTPBadRequest(text=f"completion {cid.hex()}: {e}") from None
        if rec["status"] != status or rec["model"] != self.model_hash.hex():
            raise web.HTTPBadRequest(text=f"completion {cid.hex()} is {rec['status']} for model {rec['model']}")
        if (token_hash(prompt).hex(), token_hash(output).hex()) != (rec["prompt_hash"], rec["output_hash"]):
            raise web.HTTPBadRequest(text="the prompt or output is not the one recorded")
        if not output or len(prompt) + len(output) > self.lm.context_length:
            raise web.HTTPBadRequest(text="prompt + output do not fit the context")
        body["recorded"] = rec
        return body, prompt, output

    async def _forward(self, prompt: list[int], output: list[int]) -> list[TopK]:
        async with self._lock:
            return await asyncio.get_running_loop().run_in_executor(None, self.lm.forward_tops, prompt, output)

    async def _submit(self, payload: Any) -> dict[str, Any]:
        """Sign (at the committed nonce: one submission at a time, each awaited), submit and await one
        transaction of this worker's."""
        assert self.api is not None and self.secret is not None
        async with self._submitting:
            try:
                res = await self.api.sign_and_submit(self.secret, payload, 1)
            except ApiError as e:
                return {"status": "refused", "reason": str(e)}
            st = await self.api.wait_tx(res["txid"], 60)
        return {"txid": res["txid"], **(st or {"status": "pending"})}

    async def audit(self, request: web.Request) -> web.Response:
        """Audit a recorded completion: re-execute it teacher-forced and compare, at the positions its draw seed
        reveals, with the top-K its worker committed to (the request brings them; they must make the recorded
        fingerprint). On a mismatch this worker challenges it on the L2 (COMPLETION_CHALLENGE)."""
        body, prompt, output = await self._recorded(request, "RECORDED")
        rec = body["recorded"]
        try:
            tops = [TopK(tuple(int(i) for i in ids), tuple(int(q) for q in qs)) for ids, qs in body["tops"]]
            committed = leaves(output, tops)
        except (ValueError, KeyError, TypeError) as e:
            raise web.HTTPBadRequest(text=f"malformed top-K: {e}") from None
        if fp_root(committed).hex() != rec["fingerprint"]:
            raise web.HTTPBadRequest(text="the top-K given do not make the recorded fingerprint")
        positions = [int(p) for p in rec["audit_positions"]]
        mine = await self._forward(prompt, output)
        try:
            check_revealed(dict(enumerate(output)), {p: tops[p] for p in positions}, {p: mine[p] for p in positions},
                           rec["sampling"] == "greedy")
        except Mismatch as e:
            challenge = CompletionChallenge(bytes.fromhex(rec["completion_id"]), tuple(committed[p] for p in positions),
                                            tuple(tuple(fp_proof(committed, p)) for p in positions),
                                            tuple(mine[p] for p in positions))
            log.warning("completion %s does not re-execute (%s): challenging it", rec["completion_id"], e)
            return web.json_response({"verdict": "mismatch", "reason": str(e), "positions": positions,
                                      "challenge": await self._submit(challenge)})
        return web.json_response({"verdict": "match", "positions": positions})

    async def referee(self, request: web.Request) -> web.Response:
        """Referee a challenged completion: this worker's re-execution at the drawn positions goes to the L2
        (COMPLETION_REFEREE), which decides."""
        body, prompt, output = await self._recorded(request, "CHALLENGED")
        positions = [int(p) for p in body["recorded"]["audit_positions"]]
        mine = await self._forward(prompt, output)
        verdict = CompletionReferee(bytes.fromhex(body["recorded"]["completion_id"]), tuple(mine[p] for p in positions))
        return web.json_response({"referee": await self._submit(verdict)})


def make_app(lm: LanguageModel, secret: Optional[bytes] = None, network_id: int = 0,
             api: Optional[AsyncClient] = None) -> web.Application:
    s = Server(lm, secret, network_id, api)
    app = web.Application()
    app.router.add_get("/ping", s.ping)
    app.router.add_post("/v1/generate", s.generate)
    app.router.add_post("/v1/audit", s.audit)
    app.router.add_post("/v1/referee", s.referee)
    return app


async def register(api: AsyncClient, secret: bytes, lm: LanguageModel, endpoint: str, stake: int,
                   price_in: int, price_out: int) -> None:
    """The model registered by its weights hash (by this worker's key, unless someone registered it), WorkerRegister
    (unless registered) and ModelServe of the loaded model, each committed."""
    from l2d.core.model_tx import ModelFormat, ModelRegister, ModelServe
    from l2d.core.work_tx import WorkerCaps, WorkerRegister

    h = lm.weights_sha256
    caps = WorkerCaps(0, 0, 0, 0, 0, 1, b"local", (b"smollm2",), endpoint.encode())
    payloads: list[Any] = []
    if h.hex() not in [m["weights_sha256"] for m in (await api.get("/api/models"))["models"]]:
        payloads.append(ModelRegister(h, ModelFormat.GGUF, lm.context_length, MODEL_NAME, MODEL_VERSION))
    payloads += [WorkerRegister(stake, caps), ModelServe(h, lm.context_length, price_in, price_out)]
    for payload in payloads:
        try:
            res = await api.sign_and_submit(secret, payload, 1)
            await api.wait_tx(res["txid"], 60)
        except ApiError as e:
            if "already registered" not in str(e) and "registered already" not in str(e):
                raise


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="l2-llm-worker", description=__doc__.splitlines()[0])
    ap.add_argument("--api", default="http://127.0.0.1:8650", help="an l2d node's REST base URL")
    ap.add_argument("--key", type=Path, help="the worker's L2 key file (registers and offers the model)")
    ap.add_argument("--listen", default="127.0.0.1:0", help="host:port to serve on")
    ap.add_argument("--stake", type=int, default=10_000)
    ap.add_argument("--price-in", type=int, default=1_000, help="msat per 1k input tokens")
    ap.add_argument("--price-out", type=int, default=4_000, help="msat per 1k output tokens")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda when present)")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    return asyncio.run(_run(a))


async def _run(a: Any) -> int:
    lm = LanguageModel(device=a.device)
    secret = None if a.key is None else load_secret(a.key)
    async with AsyncClient(a.api) as api:
        network_id = 0 if secret is None else (await api.network()).id
        runner, endpoint = await serve_app(make_app(lm, secret, network_id, api if secret else None), a.listen)
        if secret is not None:
            await register(api, secret, lm, endpoint, a.stake, a.price_in, a.price_out)
        print(f"l2-llm-worker serving {lm.weights_sha256.hex()} on {endpoint}", flush=True)
        try:
            await until_signalled()
        finally:
            await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
