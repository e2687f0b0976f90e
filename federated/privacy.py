"""Privacy spent by Flower's DP wrappers, per round: RDP of the Gaussian mechanism.

Flower 1.41 ships an RDP accountant only behind the optional ``flwr[dp]`` extra
(``dp_accounting``), which is not a dependency here. Every round samples all nodes (no
amplification by sampling), so the accounting is closed-form: a Gaussian release with noise
multiplier z has Rényi DP α/(2z²) at every order α; T rounds compose to c·α with c = T/(2z²);
the standard conversion ε(δ) = min_α c·α + log(1/δ)/(α-1) is minimised at
α* = 1 + sqrt(log(1/δ)/c), giving ε = c + 2·sqrt(c·log(1/δ)). This is client-level
(add/remove one participant) privacy for the fixed-clipping wrappers. The adaptive wrappers
also release a noised clipped-count each round; that extra cost is not counted here.
"""

from __future__ import annotations

import math


class GaussianRdpAccountant:
    """Cumulative (ε, δ) of repeated full-participation Gaussian releases."""

    def __init__(self, noise_multiplier: float, delta: float) -> None:
        if not noise_multiplier > 0:
            raise ValueError("noise_multiplier must be > 0 for a finite epsilon")
        if not 0 < delta < 1:
            raise ValueError("delta must be in (0, 1)")
        self.z = float(noise_multiplier)
        self.delta = float(delta)
        self.releases = 0

    def compose(self, count: int = 1) -> None:
        self.releases += count

    def epsilon(self) -> float:
        if self.releases == 0:
            return 0.0
        c = self.releases / (2 * self.z * self.z)
        return c + 2 * math.sqrt(c * math.log(1 / self.delta))
