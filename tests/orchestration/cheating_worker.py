"""A dishonest `l2-llm-worker`, for the gateway's audit test only: it serves greedy requests with sampling noise
(the second-best token at every position) while reporting each position's top-4 truthfully, so its answers are
cheaper to fake than to compute but its fingerprint commits to logits that do not make its tokens. Its teacher-forced
re-execution (/v1/audit) is the honest model's. Run as `python tests/orchestration/cheating_worker.py ARGS` (the
worker's own arguments) with the repository on PYTHONPATH."""
from __future__ import annotations

import sys
from typing import Any, Iterator, Optional, Sequence

from orchestration import llm_worker
from orchestration.llm import LanguageModel, TopK


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


if __name__ == "__main__":
    LanguageModel.generate = noisy_generate  # type: ignore[method-assign]
    sys.exit(llm_worker.main())
