"""The OpenAI-compatible gateway end to end, with real processes: an l2d daemon holding the model registry and the
paid sessions, `l2-llm-worker`s serving SmolLM2-135M-Instruct (each registers the model by its weights hash and
offers it), `l2-gateway`, and the official `openai` client: the model list, chat and text completions streamed and
not, usage on request, the errors in OpenAI's shape, estimates and jobs, and every request billed per token to the
client's paid session and recorded on the L2, the satoshis split exactly."""
from __future__ import annotations

import asyncio
import hashlib
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import httpx
import openai
import pytest
from coincurve import PrivateKey

from l2d.core.model_tx import split_sat, token_cost_msat
from orchestration.gateway import api_key
from orchestration.llm import model_path, token_hash, weights_sha256
from tests.conftest import REPO, L2dProcess, Proc

TOKEN = "gateway-test-admin-token-0001"
WORKER = hashlib.sha256(b"gateway test worker").digest()
CLIENT = hashlib.sha256(b"gateway test client").digest()
GATEWAY = hashlib.sha256(b"gateway test gateway").digest()
NAME = "SmolLM2-135M-Instruct"
Q = [{"role": "user", "content": "What is the capital of France?"}]


def pk(s: bytes) -> bytes:
    return PrivateKey(s).public_key_xonly.format()


def keyfile(path: Path, secret: bytes) -> Path:
    path.write_text(secret.hex())
    path.chmod(0o600)
    return path


def start_gateway(d: L2dProcess, tmp_path: Path, procs: list[Proc], *extra: str) -> str:
    """`l2-gateway serve` (its URL); every recorded completion audited unless extra says otherwise."""
    gw = Proc(["orchestration.gateway", "serve", "--api", d.url(""), "--listen", "127.0.0.1:0",
               "--key", str(keyfile(tmp_path / "gateway.key", GATEWAY)), "--audit-share", "100", *extra],
              tmp_path / "gw.log")
    procs.append(gw)
    m = re.search(r"l2-gateway ([0-9a-f]{64}) on (\S+)", gw.first_line())
    assert m and m.group(1) == pk(GATEWAY).hex()
    return m.group(2)


def open_session(d: L2dProcess, url: str, key: Path, deposit: int) -> str:
    """`l2-gateway open-session`, as a client runs it: the API key it prints."""
    r = subprocess.run([sys.executable, "-m", "orchestration.gateway", "open-session", "--api", d.url(""), "--key",
                        str(key), "--gateway", url.removesuffix("/v1"), "--deposit", str(deposit)],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


def recorded(d: L2dProcess, http: httpx.Client, key: str, job_id: str) -> dict[str, Any]:
    """The job once its Completion committed (the gateway records in the background)."""
    for _ in range(600):
        j = http.get(f"/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"}).json()
        if j["billing"]["status"] in ("recorded", "refused"):
            return j  # type: ignore[no-any-return]
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} was never recorded")


async def test_the_openai_client_against_the_gateway(tmp_path: Path, l2d_process: Callable[..., L2dProcess],
                                                     node_toml: Callable[..., Path], procs: list[Proc]) -> None:
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(WORKER): 10**6, pk(CLIENT): 10**6, pk(GATEWAY): 10**6},
                              TOKEN, block={"interval_ms": 50}))
    h = weights_sha256(model_path())
    worker = Proc(["orchestration.llm_worker", "--api", d.url(""), "--key", str(keyfile(tmp_path / "w.key", WORKER)),
                   "--device", "cpu"], tmp_path / "worker.log")
    procs.append(worker)
    assert re.search(r"serving " + h.hex(), await asyncio.to_thread(worker.first_line))
    [reg] = d.get("/api/models")["models"]  # nobody had registered the model: the worker did, by its weights hash
    assert (reg["weights_sha256"], reg["name"], reg["registrant"]) == (h.hex(), NAME, pk(WORKER).hex())
    url = await asyncio.to_thread(start_gateway, d, tmp_path, procs)
    client_key = keyfile(tmp_path / "client.key", CLIENT)
    key = await asyncio.to_thread(open_session, d, url, client_key, 200)
    sid = key[len("sk-l2-"):][:64]
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
    http = httpx.Client(base_url=url, timeout=60)
    balances = {who: d.get(f"/api/l2/accounts/{pk(s).hex()}")["balance_sat"] for who, s in
                (("worker", WORKER), ("gateway", GATEWAY))}

    def run() -> list[str]:
        [m] = client.models.list().data
        assert m.id == NAME and m.model_extra is not None and m.model_extra["weights_sha256"] == h.hex()
        assert m.model_extra["workers"] == 1 and m.model_extra["pricing"]["output_msat_per_1k"] == 4_000
        est = http.post("/estimate", json={"model": NAME, "messages": Q, "max_tokens": 12},
                        headers={"Authorization": f"Bearer {key}"}).json()
        full = client.chat.completions.create(model=NAME, messages=Q, max_tokens=12)  # type: ignore[arg-type]
        answer = full.choices[0].message.content
        assert answer and full.choices[0].message.role == "assistant"
        assert full.usage is not None and 0 < full.usage.completion_tokens <= 12
        assert full.usage.total_tokens == full.usage.prompt_tokens + full.usage.completion_tokens
        # the estimate counts the prompt exactly as the request did, after the chat template
        assert est["prompt_tokens"] == full.usage.prompt_tokens and est["sufficient"] is True
        assert est["max_cost_msat"] == token_cost_msat(est["prompt_tokens"], 12, 1_000, 4_000)
        assert est["valid_until_height"] > est["l2_height"] and est["available_msat"] <= 200_000
        chunks = list(client.chat.completions.create(model=NAME, messages=Q, max_tokens=12,  # type: ignore[arg-type]
                                                     stream=True, stream_options={"include_usage": True}))
        assert chunks[0].choices[0].delta.role == "assistant"
        streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert streamed == answer  # greedy: the same answer, token by token
        assert chunks[-1].choices == [] and chunks[-1].usage == full.usage
        plain = list(client.chat.completions.create(model=NAME, messages=Q, max_tokens=4,  # type: ignore[arg-type]
                                                    stream=True))
        assert all(c.usage is None for c in plain)  # usage only when asked
        text = client.completions.create(model=NAME, prompt="The sky is", max_tokens=6)
        assert text.choices[0].text and text.usage is not None and text.usage.completion_tokens <= 6
        # with the quote of an estimate: the request is never billed above it
        q = http.post("/estimate", json={"model": NAME, "prompt": "One, two,", "max_tokens": 5}).json()
        assert "available_msat" not in q  # no key, no session figures
        quoted = client.completions.create(model=NAME, prompt="One, two,", max_tokens=5,
                                           extra_body={"quote": q["quote"]})
        with pytest.raises(openai.BadRequestError) as stale:
            client.completions.create(model=NAME, prompt="x", max_tokens=1, extra_body={"quote": "quote-nonsense"})
        assert stale.value.code == "quote_expired"
        return [full.id, chunks[0].id, plain[0].id, text.id, quoted.id]
    ids = await asyncio.to_thread(run)

    # every request billed, recorded on the L2 and paid out exactly
    jobs = [await asyncio.to_thread(recorded, d, http, key, i) for i in ids]
    assert [j["billing"]["status"] for j in jobs] == ["recorded"] * 5
    assert [j["status"] for j in jobs] == ["completed"] * 5
    for j in jobs:
        assert j["cost_msat"] == token_cost_msat(j["prompt_tokens"], j["completion_tokens"], 1_000, 4_000)
        assert j["worker"] == pk(WORKER).hex() and j["session_id"] == sid
    by_txid = {j["billing"]["txid"]: j for j in jobs}
    records = sorted((d.get(f"/api/completions/{t}") for t in by_txid), key=lambda r: r["session_units_after"])
    total, paid = 0, {"worker": 0, "verifier": 0, "treasury": 0, "burned": 0}
    for r in records:  # in the order they were recorded
        j = by_txid[r["completion_id"]]
        assert r["cost_msat"] == j["cost_msat"] and r["completion_tokens"] == j["completion_tokens"]
        assert r["output_hash"] == j["output_hash"] and r["fingerprint"] == j["fingerprint"] != "00" * 32
        assert r["prompt_hash"] != token_hash([]).hex() and r["split_bp"] == {"worker": 5000, "verifier": 0,
                                                                              "treasury": 1000}
        before = total
        total += r["cost_msat"]
        assert r["session_units_after"] == total
        share = dict(zip(paid, split_sat(total // 1000 - before // 1000, 5000, 0, 1000)))
        assert r["paid_sat"] == share
        paid = {k: paid[k] + share[k] for k in paid}
    s = d.get(f"/api/sessions/{sid}")
    assert s["settled"]["units"] == total == sum(j["cost_msat"] for j in jobs)
    assert s["settled"]["amount_sat"] == total // 1000 == sum(paid.values())
    assert d.get(f"/api/l2/accounts/{pk(WORKER).hex()}")["balance_sat"] == balances["worker"] + paid["worker"]
    assert d.get(f"/api/l2/accounts/{pk(GATEWAY).hex()}")["balance_sat"] == (
        balances["gateway"] + paid["treasury"] - 5)  # the treasury share, less 1 sat fee per Completion

    n_prompt = jobs[0]["prompt_tokens"]

    def errors() -> None:
        with pytest.raises(openai.NotFoundError) as nf:
            client.chat.completions.create(model="no-such-model", messages=Q)  # type: ignore[arg-type]
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as big:
            client.chat.completions.create(model=NAME, messages=Q, max_tokens=9000)  # type: ignore[arg-type]
        assert big.value.code == "context_length_exceeded" and "maximum context length is 8192" in str(big.value)
        assert f"the prompt is {n_prompt} tokens" in str(big.value)
        for bad in ("none", "sk-l2-" + "ab" * 64, api_key(bytes.fromhex(sid), hashlib.sha256(b"wrong").digest())):
            with openai.OpenAI(base_url=url, api_key=bad, max_retries=0) as c, \
                    pytest.raises(openai.AuthenticationError) as no:
                c.chat.completions.create(model=NAME, messages=Q, max_tokens=2)  # type: ignore[arg-type]
            assert no.value.code == "invalid_api_key" and no.value.status_code == 401
        poor = open_session(d, url, client_key, 1)  # 1 sat: 1,000 msat
        with openai.OpenAI(base_url=url, api_key=poor, max_retries=0) as c, \
                pytest.raises(openai.APIStatusError) as quota:
            c.chat.completions.create(model=NAME, messages=Q, max_tokens=300)  # type: ignore[arg-type]
        assert quota.value.status_code == 402 and quota.value.code == "insufficient_quota"
        assert f"may cost up to {n_prompt + 1200} msat" in str(quota.value) and "1000 msat left" in str(quota.value)
        other = http.get(f"/jobs/{ids[0]}", headers={"Authorization": f"Bearer {poor}"})
        assert other.status_code == 404 and other.json()["error"]["code"] == "job_not_found"
    await asyncio.to_thread(errors)
    client.close()
    assert d.get(f"/api/sessions/{sid}")["settled"]["units"] == total  # the refused requests cost nothing
    assert (tmp_path / "gw.log").read_text().count("Traceback") == 0
    http.close()
    assert procs[-1].stop() == 0 and worker.stop() == 0


async def test_routing_failover_mid_stream_failure_and_cancel_are_billed_for_what_was_received(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        procs: list[Proc]) -> None:
    """Two workers serve the model, one cheaper: the scheduler's score sends requests to it (system_fingerprint
    names the worker). SIGKILLed mid-stream, the client gets an error chunk and pays for the tokens it received;
    the next request fails over to the other worker before any first token is lost. A client that closes a stream
    pays for the tokens it read (up to the two the gateway had written before it noticed)."""
    cheap_key, dear_key = hashlib.sha256(b"gateway cheap").digest(), hashlib.sha256(b"gateway dear").digest()
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(cheap_key): 10**6, pk(dear_key): 10**6,
                                                       pk(CLIENT): 10**6, pk(GATEWAY): 10**6},
                              TOKEN, block={"interval_ms": 50}))
    workers = {}
    for name, secret_, price in (("cheap", cheap_key, 3_000), ("dear", dear_key, 5_000)):
        workers[name] = Proc(["orchestration.llm_worker", "--api", d.url(""), "--key",
                              str(keyfile(tmp_path / f"{name}.key", secret_)), "--device", "cpu",
                              "--price-out", str(price)], tmp_path / f"{name}.log")
        procs.append(workers[name])
    for w in workers.values():
        assert re.search(r"serving", await asyncio.to_thread(w.first_line))
    url = await asyncio.to_thread(start_gateway, d, tmp_path, procs)
    key = await asyncio.to_thread(open_session, d, url, keyfile(tmp_path / "client.key", CLIENT), 500)
    client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
    http = httpx.Client(base_url=url, timeout=60)
    balances = {who: d.get(f"/api/l2/accounts/{pk(s).hex()}")["balance_sat"] for who, s in
                (("cheap", cheap_key), ("dear", dear_key), ("gateway", GATEWAY))}

    def ask() -> Any:
        return client.chat.completions.create(model=NAME, messages=Q, max_tokens=4)  # type: ignore[arg-type]

    def story(n: int) -> tuple[str, int]:
        """A long stream read for n content chunks, then the worker is SIGKILLed: the stream ends in an error."""
        s = client.chat.completions.create(model=NAME, max_tokens=200, stream=True,  # type: ignore[call-overload]
                                           messages=[{"role": "user", "content": "Tell me a long story."}])
        got, ident = 0, ""
        with pytest.raises(openai.APIError) as e:
            for c in s:
                ident = c.id
                got += bool(c.choices and c.choices[0].delta.content is not None and c.choices[0].delta.role is None)
                if got == n:
                    workers["cheap"].kill()
        assert "the worker failed after" in str(e.value)
        return ident, got

    def cancel(n: int) -> tuple[str, int]:
        s = client.chat.completions.create(model=NAME, max_tokens=200, stream=True,  # type: ignore[call-overload]
                                           messages=[{"role": "user", "content": "Tell me a long story."}])
        got, ident = 0, ""
        for c in s:
            ident = c.id
            got += bool(c.choices and c.choices[0].delta.content is not None and c.choices[0].delta.role is None)
            if got == n:
                break
        s.close()
        return ident, got

    first = await asyncio.to_thread(ask)
    assert first.system_fingerprint == f"l2-worker-{pk(cheap_key).hex()}"
    assert (await asyncio.to_thread(client.models.list)).data[0].model_extra["workers"] == 2
    failed_id, got = await asyncio.to_thread(story, 5)
    again = await asyncio.to_thread(ask)  # the cheap worker's offer is still on the L2; its endpoint refuses
    assert again.system_fingerprint == f"l2-worker-{pk(dear_key).hex()}"
    assert again.choices[0].message.content == first.choices[0].message.content  # the same model, greedy
    assert (tmp_path / "gw.log").read_text().count("failed before its first token") == 1
    ident, read = await asyncio.to_thread(cancel, 6)
    client.close()
    assert read == 6

    jobs = [await asyncio.to_thread(recorded, d, http, key, j) for j in (first.id, again.id, ident)]
    assert [j["status"] for j in jobs] == ["completed", "completed", "cancelled"]
    assert 6 <= jobs[2]["completion_tokens"] <= 8, jobs[2]  # what it read, and what was in flight
    assert jobs[2]["cost_msat"] == token_cost_msat(jobs[2]["prompt_tokens"], jobs[2]["completion_tokens"], 1_000,
                                                   5_000)
    assert jobs[2]["fingerprint"] == "00" * 32 and jobs[2]["billing"]["status"] == "recorded"
    assert jobs[2]["worker"] == pk(dear_key).hex()  # the dead worker is tried last: no second failover
    # the first answer, re-executed by the other worker at positions drawn after it was recorded: it matches
    audit = await poll_audit(http, key, first.id)
    assert audit["status"] == "passed" and audit["auditor"] == pk(dear_key).hex() and audit["positions"]
    assert jobs[2]["audit"]["status"] == "none"  # a cancelled answer has no fingerprint to audit
    assert (tmp_path / "gw.log").read_text().count("failed before its first token") == 1
    failed = await asyncio.to_thread(recorded, d, http, key, failed_id)
    assert failed["status"] == "failed" and failed["worker"] == pk(cheap_key).hex()
    assert failed["completion_tokens"] == got >= 5  # the worker's tokens until it died, every one delivered
    assert failed["cost_msat"] == token_cost_msat(failed["prompt_tokens"], got, 1_000, 3_000)
    units = d.get(f"/api/sessions/{key[6:70]}")["settled"]["units"]
    assert units == failed["cost_msat"] + sum(j["cost_msat"] for j in jobs)
    # each worker was paid exactly its share of what it served, the gateway its treasury share less its fees
    records = [d.get(f"/api/completions/{j['billing']['txid']}") for j in [*jobs, failed]]
    for who, secret_ in (("cheap", cheap_key), ("dear", dear_key)):
        mine = sum(r["paid_sat"]["worker"] for r in records if r["worker"] == pk(secret_).hex())
        assert d.get(f"/api/l2/accounts/{pk(secret_).hex()}")["balance_sat"] == balances[who] + mine
    assert d.get(f"/api/l2/accounts/{pk(GATEWAY).hex()}")["balance_sat"] == (
        balances["gateway"] + sum(r["paid_sat"]["treasury"] for r in records) - len(records))
    assert sum(sum(r["paid_sat"].values()) for r in records) == units // 1000
    # no worker left: 503 in OpenAI's shape, and the model is listed with no live worker
    workers["dear"].kill()
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as c:
        with pytest.raises(openai.InternalServerError) as none:
            await asyncio.to_thread(c.chat.completions.create, model=NAME, messages=Q,  # type: ignore[arg-type]
                                    max_tokens=2)
        assert none.value.status_code == 503 and none.value.code == "no_worker"
        listed = (await asyncio.to_thread(c.models.list)).data[0].model_extra
        assert listed is not None and (listed["workers"], listed["workers_live"]) == (2, 0)
    http.close()
    assert procs[-1].stop() == 0



async def poll_audit(http: httpx.Client, key: str, job_id: str) -> dict[str, Any]:
    """The job's audit once it has a verdict."""
    for _ in range(1200):
        j = (await asyncio.to_thread(http.get, f"/jobs/{job_id}", headers={"Authorization": f"Bearer {key}"})).json()
        if j["audit"]["status"] in ("passed", "worker-slashed", "auditor-slashed", "skipped", "error"):
            return j["audit"]  # type: ignore[no-any-return]
        await asyncio.sleep(0.1)
    raise AssertionError(f"job {job_id} was never audited")


@pytest.mark.parametrize("cheat_mode, why", [("noise", "is not the greedy choice"), ("model", "re-execution")])
async def test_a_cheating_worker_is_challenged_refereed_and_slashed(
        cheat_mode: str, why: str, tmp_path: Path, l2d_process: Callable[..., L2dProcess],
        node_toml: Callable[..., Path], procs: list[Proc]) -> None:
    """The cheapest worker cheats: it answers greedy requests with the second-best token at every position (its
    top-4 true), or answers from another model (one layer perturbed). Its answer is drawn for audit; the next worker
    re-executes it, finds it does not match at the drawn positions and challenges it on the L2; the third referees;
    the ledger slashes the cheat's stake (half to the challenger, a quarter to the referee, the rest burned). The
    gateway routes nothing more to it, and the next answer, from an honest worker, passes its audit."""
    cheat, a, b = (hashlib.sha256(b"gateway " + n).digest() for n in (b"cheat", b"honest a", b"honest b"))
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(cheat): 10**6, pk(a): 10**6, pk(b): 10**6,
                                                       pk(CLIENT): 10**6, pk(GATEWAY): 10**6}, TOKEN,
                              block={"interval_ms": 50}))
    workers = [Proc(["tests/orchestration/cheating_worker.py", "--cheat", cheat_mode, "--api", d.url(""), "--key",
                     str(keyfile(tmp_path / "cheat.key", cheat)), "--device", "cpu", "--price-out", "3000"],
                    tmp_path / "cheat.log")]
    for name, secret_, price in (("a", a, "4000"), ("b", b, "5000")):
        workers.append(Proc(["orchestration.llm_worker", "--api", d.url(""), "--key",
                             str(keyfile(tmp_path / f"{name}.key", secret_)), "--device", "cpu", "--price-out", price],
                            tmp_path / f"{name}.log"))
    procs.extend(workers)
    for w in workers:
        assert re.search(r"serving", await asyncio.to_thread(w.first_line))
    url = await asyncio.to_thread(start_gateway, d, tmp_path, procs)
    key = await asyncio.to_thread(open_session, d, url, keyfile(tmp_path / "client.key", CLIENT), 500)
    http = httpx.Client(base_url=url, timeout=60)
    balances = {n: d.get(f"/api/l2/accounts/{pk(s).hex()}")["balance_sat"] for n, s in (("a", a), ("b", b))}
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
        def ask() -> Any:
            return client.chat.completions.create(model=NAME, messages=Q, max_tokens=12)  # type: ignore[arg-type]
        first = await asyncio.to_thread(ask)
        assert first.system_fingerprint == f"l2-worker-{pk(cheat).hex()}"
        audit = await poll_audit(http, key, first.id)
        assert audit["status"] == "worker-slashed" and audit["auditor"] == pk(a).hex(), audit
        assert why in audit["reason"] and audit["challenge"]["status"] == "committed"
        assert audit["referee"]["worker"] == pk(b).hex() and audit["referee"]["status"] == "committed"
        second = await asyncio.to_thread(ask)
    assert second.system_fingerprint == f"l2-worker-{pk(a).hex()}"  # the cheat gets nothing more
    assert second.choices[0].message.content != first.choices[0].message.content
    passed = await poll_audit(http, key, second.id)
    assert passed["status"] == "passed" and passed["auditor"] == pk(b).hex()
    # the ledger's record of it: the challenge, the verdict, the slash and who was paid
    job = (await asyncio.to_thread(http.get, f"/jobs/{first.id}", headers={"Authorization": f"Bearer {key}"})).json()
    rec = d.get(f"/api/completions/{job['billing']['txid']}")
    assert rec["status"] == "WORKER_SLASHED" and rec["fingerprint"] == job["fingerprint"]
    assert rec["challenge"]["challenger"] == pk(a).hex() and rec["challenge"]["referee"] == pk(b).hex()
    assert (rec["challenge"]["loser"], rec["challenge"]["slash_sat"]) == ("worker", 10_000)
    offers = d.get("/api/models")["models"][0]["offers"]
    assert [w["stake_sat"] for w in offers if w["worker"] == pk(cheat).hex()] == [0]  # its whole 10,000 stake
    job2 = (await asyncio.to_thread(http.get, f"/jobs/{second.id}", headers={"Authorization": f"Bearer {key}"})).json()
    earned = d.get(f"/api/completions/{job2['billing']['txid']}")["paid_sat"]["worker"]  # a served the second
    got = {n: d.get(f"/api/l2/accounts/{pk(s).hex()}")["balance_sat"] - balances[n] for n, s in (("a", a), ("b", b))}
    assert got == {"a": 5_000 - 1 + earned, "b": 2_500 - 1}  # half and a quarter of the slash, less a 1-sat fee
    http.close()
    assert procs[-1].stop() == 0


async def test_a_worker_that_does_not_sign_its_result_is_not_paid_and_gets_nothing_more(
        tmp_path: Path, l2d_process: Callable[..., L2dProcess], node_toml: Callable[..., Path],
        procs: list[Proc]) -> None:
    """A result the gateway cannot hold its worker to (no signature) is the worker's fault: the client gets 502
    worker_failed and pays nothing, the worker is paid nothing and routed nothing more; the next request goes to
    the other worker and is billed as usual."""
    cheat, honest = hashlib.sha256(b"gateway unsigned").digest(), hashlib.sha256(b"gateway signed").digest()
    d = l2d_process(node_toml(tmp_path / "node.toml", {pk(cheat): 10**6, pk(honest): 10**6, pk(CLIENT): 10**6,
                                                       pk(GATEWAY): 10**6}, TOKEN, block={"interval_ms": 50}))
    workers = [Proc(["tests/orchestration/cheating_worker.py", "--cheat", "unsigned", "--api", d.url(""), "--key",
                     str(keyfile(tmp_path / "cheat.key", cheat)), "--device", "cpu", "--price-out", "3000"],
                    tmp_path / "cheat.log"),
               Proc(["orchestration.llm_worker", "--api", d.url(""), "--key",
                     str(keyfile(tmp_path / "honest.key", honest)), "--device", "cpu", "--price-out", "5000"],
                    tmp_path / "honest.log")]
    procs.extend(workers)
    for w in workers:
        assert re.search(r"serving", await asyncio.to_thread(w.first_line))
    url = await asyncio.to_thread(start_gateway, d, tmp_path, procs)
    key = await asyncio.to_thread(open_session, d, url, keyfile(tmp_path / "client.key", CLIENT), 500)
    before = d.get(f"/api/l2/accounts/{pk(cheat).hex()}")["balance_sat"]
    with openai.OpenAI(base_url=url, api_key=key, max_retries=0) as client:
        def ask() -> Any:
            return client.chat.completions.create(model=NAME, messages=Q, max_tokens=4)  # type: ignore[arg-type]
        with pytest.raises(openai.APIStatusError) as bad:
            await asyncio.to_thread(ask)
        assert bad.value.status_code == 502 and bad.value.code == "worker_failed"
        assert "not signed by its key" in str(bad.value)
        good = await asyncio.to_thread(ask)
    assert good.system_fingerprint == f"l2-worker-{pk(honest).hex()}"
    http = httpx.Client(base_url=url, timeout=60)
    job = await asyncio.to_thread(recorded, d, http, key, good.id)
    http.close()
    assert d.get(f"/api/sessions/{key[6:70]}")["settled"]["units"] == job["cost_msat"]  # only the good answer
    assert d.get(f"/api/l2/accounts/{pk(cheat).hex()}")["balance_sat"] == before
    assert procs[-1].stop() == 0
