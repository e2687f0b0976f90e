"""The OpenAI-compatible gateway end to end, with real processes: an l2d daemon holding the model registry, an
`l2-llm-worker` serving SmolLM2-135M-Instruct (it registers the model by its weights hash and offers it), `l2-gateway`,
and the official `openai` client: the model list, chat and text completions streamed and not (greedy: the stream
spells the same answer), usage on request, and the errors in OpenAI's shape."""
from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path
from typing import Any, Callable

import openai
import pytest
from coincurve import PrivateKey

from orchestration.llm import model_path, weights_sha256
from tests.conftest import L2dProcess, Proc

TOKEN = "gateway-test-admin-token-0001"
WORKER = hashlib.sha256(b"gateway test worker").digest()
NAME = "SmolLM2-135M-Instruct"


def pk(s: bytes) -> bytes:
    return PrivateKey(s).public_key_xonly.format()


async def test_the_openai_client_against_the_gateway(tmp_path: Path, l2d_process: Callable[..., L2dProcess],
                                                     node_toml: Callable[..., Path], poll: Callable[..., Any],
                                                     procs: list[Proc]) -> None:
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(WORKER): 10**6}, TOKEN, block={"interval_ms": 50}))
    h = weights_sha256(model_path())
    key = tmp_path / "worker.key"
    key.write_text(WORKER.hex())
    key.chmod(0o600)
    worker = Proc(["orchestration.llm_worker", "--api", d.url(""), "--key", str(key), "--device", "cpu"],
                  tmp_path / "worker.log")
    procs.append(worker)
    assert re.search(r"serving " + h.hex(), await asyncio.to_thread(worker.first_line))
    [reg] = d.get("/api/models")["models"]  # nobody had registered the model: the worker did, by its weights hash
    assert (reg["weights_sha256"], reg["name"], reg["registrant"]) == (h.hex(), NAME, pk(WORKER).hex())
    gateway = Proc(["orchestration.gateway", "--api", d.url(""), "--listen", "127.0.0.1:0"], tmp_path / "gw.log")
    procs.append(gateway)
    url = re.search(r"on (\S+)", await asyncio.to_thread(gateway.first_line))
    assert url
    client = openai.OpenAI(base_url=url.group(1), api_key="none", max_retries=0)

    def run() -> None:
        [m] = client.models.list().data
        assert m.id == NAME and m.model_extra is not None and m.model_extra["weights_sha256"] == h.hex()
        assert m.model_extra["workers"] == 1 and m.model_extra["pricing"]["output_msat_per_1k"] == 4_000
        q = [{"role": "user", "content": "What is the capital of France?"}]
        full = client.chat.completions.create(model=NAME, messages=q, max_tokens=12)  # type: ignore[arg-type]
        answer = full.choices[0].message.content
        assert answer and full.choices[0].message.role == "assistant"
        assert full.usage is not None and 0 < full.usage.completion_tokens <= 12
        assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
        chunks = list(client.chat.completions.create(model=NAME, messages=q, max_tokens=12,  # type: ignore[arg-type]
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer  # greedy: the same answer, token by token
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
        plain = list(client.chat.completions.create(model=NAME, messages=q, max_tokens=4,  # type: ignore[arg-type]
                                                    stream=True))
        assert all(c.usage is None for c in plain)  # usage only when asked
        text = client.completions.create(model=NAME, prompt="The sky is", max_tokens=6)
        assert text.choices[0].text and text.usage is not None and text.usage.completion_tokens <= 6
        with pytest.raises(openai.NotFoundError) as nf:
            client.chat.completions.create(model="no-such-model", messages=q)  # type: ignore[arg-type]
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as big:
            client.chat.completions.create(model=NAME, messages=q, max_tokens=9000)  # type: ignore[arg-type]
        assert big.value.code == "context_length_exceeded" and "maximum context length is 8192" in str(big.value)
    await asyncio.to_thread(run)
    assert gateway.stop() == 0 and worker.stop() == 0


async def test_requests_go_to_the_cheaper_worker_and_fail_over_when_it_dies(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        procs: list[Proc]) -> None:
    """Two workers serve the model, one cheaper: requests go to it (system_fingerprint names the worker); SIGKILLed,
    the next request is served by the other, before any first token was lost."""
    cheap_key, dear_key = hashlib.sha256(b"gateway cheap").digest(), hashlib.sha256(b"gateway dear").digest()
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(cheap_key): 10**6, pk(dear_key): 10**6}, TOKEN,
                              block={"interval_ms": 50}))
    workers = {}
    for name, secret_, price in (("cheap", cheap_key, 3_000), ("dear", dear_key, 5_000)):
        key = tmp_path / f"{name}.key"
        key.write_text(secret_.hex())
        key.chmod(0o600)
        workers[name] = Proc(["orchestration.llm_worker", "--api", d.url(""), "--key", str(key), "--device", "cpu",
                              "--price-out", str(price)], tmp_path / f"{name}.log")
        procs.append(workers[name])
    for w in workers.values():
        assert re.search(r"serving", await asyncio.to_thread(w.first_line))
    gateway = Proc(["orchestration.gateway", "--api", d.url(""), "--listen", "127.0.0.1:0"], tmp_path / "gw.log")
    procs.append(gateway)
    url = re.search(r"on (\S+)", await asyncio.to_thread(gateway.first_line))
    assert url
    client = openai.OpenAI(base_url=url.group(1), api_key="none", max_retries=0)
    q = [{"role": "user", "content": "Say hello."}]

    def ask() -> Any:
        return client.chat.completions.create(model=NAME, messages=q, max_tokens=4)  # type: ignore[arg-type]
    first = await asyncio.to_thread(ask)
    assert first.system_fingerprint == f"l2-worker-{pk(cheap_key).hex()}"
    assert (await asyncio.to_thread(client.models.list)).data[0].model_extra["workers"] == 2
    workers["cheap"].kill()  # SIGKILL: its offer is still on the L2, its endpoint refuses
    again = await asyncio.to_thread(ask)
    assert again.system_fingerprint == f"l2-worker-{pk(dear_key).hex()}"
    assert again.choices[0].message.content == first.choices[0].message.content  # the same model, greedy
    assert "failed before its first token" in (tmp_path / "gw.log").read_text()
    assert gateway.stop() == 0
