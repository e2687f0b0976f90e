"""`l2-gateway`: an OpenAI-compatible front for the registered language models (docs/inference.md, "Gateway").

Its own process, not a part of the daemon: it holds long streaming HTTP requests and a tokenizer, restarts and
scales apart from the member's consensus work, and talks to the daemon over REST like any client (the registry, and
later the sessions and settlements). It serves

    GET  /v1/models             the registered models (GET /api/models) that an ACTIVE worker offers, with pricing,
                                context length and workers
    POST /v1/chat/completions   messages -> the chat template -> a worker's /v1/generate; streamed (SSE: the first
                                delta carries the role, `data: [DONE]` last; usage only if stream_options.include_usage)
                                or not
    POST /v1/completions        a prompt string, the same way

routing each request to the offer with the lowest output price (then the worker key), failing over to the next one
if a worker cannot be reached before its first token. Errors have OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`: 404 unknown model, 400 context overflow or a malformed request,
503 no worker. Payment per token by paid sessions, `/v1/estimate`, `/v1/jobs/{id}` and recording the completions on
the L2 for audits are not built yet.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import time
import uuid
from typing import Any, AsyncIterator, Optional

import aiohttp
from aiohttp import web

from l2d.aio import serve_app, until_signalled
from l2d.client import AsyncClient
from l2d.logs import setup_logging

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 256


class OpenAIError(Exception):
    def __init__(self, status: int, message: str, type_: str, code: Optional[str] = None,
                 param: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.type, self.code, self.param = status, type_, code, param

    def response(self) -> web.Response:
        return web.json_response({"error": {"message": str(self), "type": self.type, "param": self.param,
                                            "code": self.code}}, status=self.status)


@web.middleware
async def errors(request: web.Request, handler: Any) -> web.StreamResponse:
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except OpenAIError as e:
        return e.response()
    except web.HTTPException as e:
        return OpenAIError(e.status, e.reason or "error", "invalid_request_error").response()


class Gateway:
    def __init__(self, api: AsyncClient, tokenizer: Any) -> None:
        self.api, self.tok = api, tokenizer
        self.http: Optional[aiohttp.ClientSession] = None

    async def models(self) -> list[dict[str, Any]]:
        return [m for m in (await self.api.get("/api/models"))["models"] if m["offers"]]

    async def model(self, name: Any) -> dict[str, Any]:
        if not isinstance(name, str):
            raise OpenAIError(400, "'model' is required", "invalid_request_error", param="model")
        for m in await self.models():
            if name in (m["name"], m["weights_sha256"]):
                return m
        raise OpenAIError(404, f"The model '{name}' does not exist or no worker serves it", "invalid_request_error",
                          code="model_not_found", param="model")

    async def list_models(self, request: web.Request) -> web.Response:
        data = [{"id": m["name"], "object": "model", "created": m["height"], "owned_by": m["registrant"],
                 "version": m["version"], "weights_sha256": m["weights_sha256"],
                 "context_length": max(o["context_length"] for o in m["offers"]),
                 "pricing": {"input_msat_per_1k": min(o["price_in_msat_per_1k"] for o in m["offers"]),
                             "output_msat_per_1k": min(o["price_out_msat_per_1k"] for o in m["offers"])},
                 "workers": len(m["offers"])} for m in await self.models()]
        return web.json_response({"object": "list", "data": data})

    async def _body(self, request: web.Request) -> dict[str, Any]:
        try:
            body = await request.json()
        except (ValueError, UnicodeDecodeError):
            raise OpenAIError(400, "the body is not JSON", "invalid_request_error") from None
        if not isinstance(body, dict):
            raise OpenAIError(400, "the body must be a JSON object", "invalid_request_error")
        return body

    def _max_tokens(self, body: dict[str, Any]) -> int:
        v = body.get("max_completion_tokens", body.get("max_tokens", DEFAULT_MAX_TOKENS))
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise OpenAIError(400, "max_tokens must be a positive integer", "invalid_request_error",
                              param="max_tokens")
        return v

    async def chat(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        m = await self.model(body.get("model"))
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages or not all(
                isinstance(x, dict) and isinstance(x.get("content"), str) and isinstance(x.get("role"), str)
                for x in messages):
            raise OpenAIError(400, "messages must be a non-empty list of {role, content}", "invalid_request_error",
                              param="messages")
        enc: Any = self.tok.apply_chat_template([{"role": x["role"], "content": x["content"]} for x in messages],
                                                add_generation_prompt=True)
        prompt = [int(t) for t in (enc["input_ids"] if hasattr(enc, "keys") else enc)]
        return await self.complete(request, body, m, prompt, chat=True)

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._body(request)
        m = await self.model(body.get("model"))
        if not isinstance(body.get("prompt"), str) or not body["prompt"]:
            raise OpenAIError(400, "prompt must be a non-empty string", "invalid_request_error", param="prompt")
        prompt = [int(t) for t in self.tok(body["prompt"])["input_ids"]]
        return await self.complete(request, body, m, prompt, chat=False)

    async def complete(self, request: web.Request, body: dict[str, Any], m: dict[str, Any], prompt: list[int],
                       chat: bool) -> web.StreamResponse:
        max_tokens = self._max_tokens(body)
        offers = sorted(m["offers"], key=lambda o: (o["price_out_msat_per_1k"], o["worker"]))
        ctx = max(o["context_length"] for o in offers)
        if len(prompt) + max_tokens > ctx:
            raise OpenAIError(400, f"This model's maximum context length is {ctx} tokens; the prompt is "
                              f"{len(prompt)} tokens and max_tokens {max_tokens}", "invalid_request_error",
                              code="context_length_exceeded", param="messages" if chat else "prompt")
        seed = body.get("seed")
        gen = {"prompt": prompt, "max_tokens": max_tokens, "seed": seed if isinstance(seed, int) else None,
               "temperature": float(body.get("temperature") or 1.0)}
        stream, first, worker = await self.open_stream(offers, gen)
        ident = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        served_by = f"l2-worker-{worker}"  # system_fingerprint: which worker answered
        created = int(time.time())
        name = m["name"]
        if body.get("stream"):
            opts = body.get("stream_options") or {}
            return await self.sse(request, stream, first, ident, created, name, chat, len(prompt),
                                  bool(isinstance(opts, dict) and opts.get("include_usage")), served_by)
        text, done = "", None
        async for line in _chain(first, stream):
            if line.get("done"):
                done = line
                break
            text += line["text"]
        n_out = int(done["tokens"]) if done else 0
        usage = {"prompt_tokens": len(prompt), "completion_tokens": n_out, "total_tokens": len(prompt) + n_out}
        reason = done["finish_reason"] if done else "length"
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text},
                                      "finish_reason": reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": reason, "logprobs": None}
        return web.json_response({"id": ident, "object": "chat.completion" if chat else "text_completion",
                                  "created": created, "model": name, "system_fingerprint": served_by,
                                  "choices": [choice], "usage": usage})

    async def open_stream(self, offers: list[dict[str, Any]], gen: dict[str, Any]
                          ) -> tuple[AsyncIterator[dict[str, Any]], dict[str, Any], str]:
        """The first worker that answers with a first token (failover before it): its remaining lines, the first,
        and the worker's key."""
        assert self.http is not None
        for o in offers:
            try:
                resp = await self.http.post(f"http://{o['endpoint']}/v1/generate", json=gen,
                                            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120))
                if resp.status != 200:
                    log.warning("worker %s refused: %s", o["worker"], resp.status)
                    resp.release()
                    continue
                lines = _lines(resp)
                first = await lines.__anext__()
                return lines, first, str(o["worker"])
            except (aiohttp.ClientError, asyncio.TimeoutError, StopAsyncIteration, ValueError) as e:
                log.warning("worker %s failed before its first token (%s): trying the next", o["worker"], e)
        raise OpenAIError(503, "no worker is free to serve this model", "server_error", code="no_worker")

    async def sse(self, request: web.Request, stream: AsyncIterator[dict[str, Any]], first: dict[str, Any],
                  ident: str, created: int, name: str, chat: bool, n_prompt: int,
                  include_usage: bool, served_by: str) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        obj = "chat.completion.chunk" if chat else "text_completion"

        async def send(choice: dict[str, Any], usage: Any = None, choices: Optional[list[Any]] = None) -> None:
            chunk = {"id": ident, "object": obj, "created": created, "model": name, "system_fingerprint": served_by,
                     "choices": [choice] if choices is None else choices}
            if include_usage:
                chunk["usage"] = usage
            await resp.write(f"data: {json.dumps(chunk)}\n\n".encode())
        if chat:
            await send({"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None})
        n_out, reason = 0, "length"
        try:
            async for line in _chain(first, stream):
                if line.get("done"):
                    n_out, reason = int(line["tokens"]), line["finish_reason"]
                    break
                n_out += 1
                if chat:
                    await send({"index": 0, "delta": {"content": line["text"]}, "finish_reason": None})
                else:
                    await send({"index": 0, "text": line["text"], "finish_reason": None})
            final = ({"index": 0, "delta": {}, "finish_reason": reason} if chat
                     else {"index": 0, "text": "", "finish_reason": reason})
            await send(final)
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as e:  # the worker died mid-stream
            err = {"error": {"message": f"the worker failed after {n_out} tokens: {e}", "type": "server_error",
                             "param": None, "code": "worker_failed"}}
            await resp.write(f"data: {json.dumps(err)}\n\n".encode())
        if include_usage:
            await send({}, {"prompt_tokens": n_prompt, "completion_tokens": n_out,
                            "total_tokens": n_prompt + n_out}, choices=[])
        await resp.write(b"data: [DONE]\n\n")
        return resp


async def _lines(resp: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    try:
        async for raw in resp.content:
            if raw.strip():
                yield json.loads(raw)
    finally:
        resp.release()


async def _chain(first: dict[str, Any], rest: AsyncIterator[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    yield first
    async for x in rest:
        yield x


def make_app(gw: Gateway) -> web.Application:
    app = web.Application(middlewares=[errors])
    app.router.add_get("/v1/models", gw.list_models)
    app.router.add_post("/v1/chat/completions", gw.chat)
    app.router.add_post("/v1/completions", gw.completions)

    async def session(app: web.Application) -> AsyncIterator[None]:
        gw.http = aiohttp.ClientSession()
        yield
        await gw.http.close()
    app.cleanup_ctx.append(session)
    return app


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(prog="l2-gateway", description=__doc__.splitlines()[0])
    ap.add_argument("--api", default="http://127.0.0.1:8650", help="an l2d node's REST base URL")
    ap.add_argument("--listen", default="127.0.0.1:8700")
    ap.add_argument("--log-level", default="INFO")
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    return asyncio.run(_run(a))


async def _run(a: Any) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoTokenizer

    from .llm import model_path

    path = model_path()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    async with AsyncClient(a.api) as api:
        runner, endpoint = await serve_app(make_app(Gateway(api, tokenizer)), a.listen)
        print(f"l2-gateway on http://{endpoint}/v1", flush=True)
        try:
            await until_signalled()
        finally:
            await runner.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
