"""A dishonest `l2-llm-worker`, for the gateway's audit test only. `--cheat noise`: it serves greedy requests with
sampling noise (the second-best token at every position) while reporting each position's top-4 truthfully;
`--cheat model`: it serves a different model (the same one with a layer perturbed) and reports that model's top-4;
`--cheat unsigned`: it answers but does not sign its results.
Either way its fingerprint commits to what it did, which is not what the registered model does (the test never
asks it to audit). Run as
`python tests/orchestration/cheating_worker.py --cheat MODE ARGS` (then the worker's own arguments) with the
repository on PYTHONPATH."""
from __future__ import annotations

import sys
from typing import Any, Iterator, Optional, Sequence

from orchestration import llm_worker
from orchestration.llm import LanguageModel, TopK

honest_init = LanguageModel.__init__


def noisy_generate(self: LanguageModel, prompt: Sequence[int], max_tokens: int, seed: Optional[int] = None,
                   temperature: float = 1.0) -> Iterator[tuple[int, TopK]]:
    torch: Any = self.torch
    ids = torch.tensor([list(prompt)], device=self.device)
    cache = None
    with torch.no_grad():
        for _ in range(max_tokens):
            out = self.model(ids, cache=cache, use_cache=True)
            cache = out.cache
            top = self._top(out.logits[0, -1])
            tok = top.ids[1]  # the noise: never the greedy choice
            yield tok, top
            ids = torch.tensor([[tok]], device=self.device)


def other_model_init(self: LanguageModel, *args: Any, **kw: Any) -> None:
    honest_init(self, *args, **kw)
    torch: Any = self.torch
    w = self.model.model.layers[0].mlp.down_proj.weight
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        w.add_(torch.randn(w.shape, generator=gen) * 0.2)


if __name__ == "__main__":
    mode = sys.argv[sys.argv.index("--cheat") + 1]
    del sys.argv[sys.argv.index("--cheat"):sys.argv.index("--cheat") + 2]
    if mode == "noise":
        LanguageModel.generate = noisy_generate  # type: ignore[method-assign]
    elif mode == "model":
        LanguageModel.__init__ = other_model_init  # type: ignore[method-assign]
    elif mode == "unsigned":  # answers honestly but does not sign its results (nothing to hold it to)
        llm_worker.Server.sign = lambda self, *args: bytes(64)  # type: ignore[method-assign]
    else:
        raise SystemExit(f"unknown cheat {mode!r}")
    sys.exit(llm_worker.main())
