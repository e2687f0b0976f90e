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

    POST /v1/audit  {"prompt": [ids], "output": [ids], "positions": [i, ...]}

-> `{"tops": [[i, [top-4 ids], [quantised logits]], ...]}`, this worker's teacher-forced re-execution of another's
result (a gateway's audit); and `GET /ping` (the coordinator's latency probe). Decoding runs in one thread, one request
at a time (the model is one per process); the others wait.
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
from l2d.core.model_tx import sign_result
from l2d.keys import load_secret
from l2d.logs import setup_logging

from .llm import LanguageModel, TopK, fingerprint, token_hash, weights_sha256

log = logging.getLogger(__name__)

MAX_TOKENS = 1024
MODEL_NAME, MODEL_VERSION = b"SmolLM2-135M-Instruct", b"Q4_1"  # how the worker registers the model if nobody has


class Server:
    def __init__(self, lm: LanguageModel, secret: Optional[bytes] = None, network_id: int = 0) -> None:
        """secret: the worker's L2 key, which signs each result (without one, results are unsigned and their
        fingerprints cannot be recorded)."""
        self.lm, self.secret, self.network_id = lm, secret, network_id
        self.model_hash = weights_sha256(lm.path)
        self._lock = asyncio.Lock()

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

    async def audit(self, request: web.Request) -> web.Response:
        """Re-execute someone else's result, teacher-forced: the top-K of this worker's model at the positions
        asked (the gateway compares them with what the result's worker committed to)."""
        try:
            body = await request.json()
            prompt, output = [int(x) for x in body["prompt"]], [int(x) for x in body["output"]]
            positions = sorted({int(x) for x in body["positions"]})
        except (ValueError, KeyError, TypeError) as e:
            return web.json_response({"error": f"malformed request: {e}"}, status=400)
        if (not prompt or not output or len(prompt) + len(output) > self.lm.context_length
                or not all(0 <= p < len(output) for p in positions)):
            return web.json_response({"error": "prompt + output do not fit the context, or a position is outside "
                                               "the output"}, status=400)
        async with self._lock:
            tops = await asyncio.get_running_loop().run_in_executor(None, self.lm.forward_tops, prompt, output)
        return web.json_response({"tops": [[p, list(tops[p].ids), list(tops[p].logits)] for p in positions]})


def make_app(lm: LanguageModel, secret: Optional[bytes] = None, network_id: int = 0) -> web.Application:
    s = Server(lm, secret, network_id)
    app = web.Application()
    app.router.add_get("/ping", s.ping)
    app.router.add_post("/v1/generate", s.generate)
    app.router.add_post("/v1/audit", s.audit)
    return app


async def register(api: AsyncClient, secret: bytes, lm: LanguageModel, endpoint: str, stake: int,
                   price_in: int, price_out: int) -> None:
    """The model registered by its weights hash (by this worker's key, unless someone registered it), WorkerRegister
    (unless registered) and ModelServe of the loaded model, each committed."""
    from l2d.core.model_tx import ModelFormat, ModelRegister, ModelServe
    from l2d.core.work_tx import WorkerCaps, WorkerRegister

    h = weights_sha256(lm.path)
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
    network_id = 0
    if secret is not None:
        async with AsyncClient(a.api) as api:
            network_id = (await api.network()).id
    runner, endpoint = await serve_app(make_app(lm, secret, network_id), a.listen)
    if secret is not None:
        async with AsyncClient(a.api) as api:
            await register(api, secret, lm, endpoint, a.stake, a.price_in, a.price_out)
    print(f"l2-llm-worker serving {weights_sha256(lm.path).hex()} on {endpoint}", flush=True)
    try:
        await until_signalled()
    finally:
        await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
