"""Server-side differential privacy: DP-FedAvg's clip-and-noise, and its own accountant.

Every site takes part in every round, so each round is one Gaussian mechanism with sampling
rate 1 on the sum of the clipped changes (sensitivity ``clipNorm`` when one site is added or
removed). Its Rényi DP at order ``a`` is exactly ``a / (2 sigma^2)``; ``rounds`` rounds compose
to ``rounds * a / (2 sigma^2)``, converted to (ε, δ) with the same bound and the same orders
as Opacus's RDP accountant (Balle et al. 2020, "Hypothesis testing interpretations and Rényi
differential privacy", Theorem 21). The aggregator needs no PyTorch for it.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass, field

import numpy as np

from fedstudy.spec import ServerPrivacy

# The Rényi orders Opacus's RDP accountant tries by default.
ORDERS: tuple[float, ...] = tuple([1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)))


def epsilon_after(noise_multiplier: float, rounds: int, delta: float) -> float:
    """ε spent after ``rounds`` Gaussian mechanisms of ``noise_multiplier`` at rate 1."""
    if rounds <= 0:
        return 0.0
    best = math.inf
    for a in ORDERS:
        rdp = rounds * a / (2.0 * noise_multiplier**2)
        eps = rdp - (math.log(delta) + math.log(a)) / (a - 1) + math.log((a - 1) / a)
        best = min(best, eps)
    return max(best, 0.0)


def calibrate(target_epsilon: float, rounds: int, delta: float) -> float:
    """The smallest noise multiplier (to 1e-4 relative) with ``rounds`` rounds at or below
    ``target_epsilon``."""
    low, high = 1e-3, 1.0
    while epsilon_after(high, rounds, delta) > target_epsilon:
        high *= 2.0
        if high > 1e6:
            raise ValueError(f"no noise multiplier reaches ε={target_epsilon} in {rounds} rounds")
    while (high - low) / high > 1e-4:
        mid = (low + high) / 2.0
        if epsilon_after(mid, rounds, delta) > target_epsilon:
            low = mid
        else:
            high = mid
    return high


@dataclass
class ServerDP:
    """Clip each site's change to ``clip``, add N(0, (noise * clip)^2) to the sum of changes,
    divide by ``denominator`` (the number of sites in the study)."""

    clip: float
    noise: float
    delta: float
    denominator: int
    rng: np.random.Generator = field(
        default_factory=lambda: np.random.default_rng(secrets.randbits(128))
    )

    @classmethod
    def from_spec(cls, spec: ServerPrivacy, rounds: int, sites: int) -> ServerDP:
        noise = spec.noiseMultiplier
        if noise is None:
            assert spec.targetEpsilon is not None
            noise = calibrate(spec.targetEpsilon, rounds, spec.delta)
        return cls(clip=spec.clipNorm, noise=noise, delta=spec.delta, denominator=sites)

    def epsilon(self, rounds: int) -> float:
        return epsilon_after(self.noise, rounds, self.delta)

    def noisy_change(self, change_sum: np.ndarray) -> np.ndarray:
        """(sum of clipped changes + noise) / denominator, in ``change_sum``'s dtype."""
        noise = self.rng.normal(0.0, self.noise * self.clip, size=change_sum.shape)
        out: np.ndarray = ((change_sum + noise) / self.denominator).astype(change_sum.dtype)
        return out

    def report(self, rounds: int) -> dict[str, float | int]:
        return {
            "epsilon": self.epsilon(rounds),
            "delta": self.delta,
            "noise_multiplier": self.noise,
            "clip_norm": self.clip,
            "rounds": rounds,
        }
