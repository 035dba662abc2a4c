"""Frozen configuration objects shared by the engine, the drafters and the CLI."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SamplingConfig:
    """How a token is chosen from a distribution; applied identically to target (p) and draft (q).

    temperature == 0 means greedy (argmax); top_k == 0 and top_p == 1.0 disable those filters.
    coupled: each token is the Gumbel-max draw whose noise is keyed by (seed, its sequence index),
    for the target and the drafts alike (the `gumbel` rule; verispec.engine.sampling): the output
    is then a function of the seed, whichever method produced it. Needs a seed.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    coupled: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature must be a number >= 0 (0 = greedy), got {self.temperature!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 = no top-k filter), got {self.top_k!r}")
        if not isinstance(self.top_p, (int, float)) or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {self.top_p!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            raise ValueError(f"seed must be an integer or None, got {self.seed!r}")
        if self.coupled and self.seed is None and not self.greedy:
            raise ValueError("coupled (Gumbel) sampling needs a seed: the seed keys the noise of every position")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
