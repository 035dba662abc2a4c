"""How many tokens a chain drafter should draft next: chosen from what it has observed.

transformers' heuristic schedule grows the length by 2 after a fully accepted draft and
shrinks it by 1 otherwise. This picks it instead from a model of the step: with per-token
acceptance rate a (the draft's token i is kept given tokens < i were), a chain of k yields
(1 - a^(k+1)) / (1 - a) tokens per target pass (the accepted ones plus the target's own),
and costs k draft passes plus one target pass. The length with the most tokens per second
wins. a, the draft pass time and the target pass time are running estimates (exponentially
weighted, so a change of content, say from prose to code, moves them within a few steps).
"""
from __future__ import annotations

import time


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens per pass of a chain of k under per-token acceptance alpha (incl. the bonus token)."""
    if alpha >= 1.0:
        return k + 1.0
    return (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_length(alpha: float, draft_s: float, target_s: float, k_max: int) -> int:
    """The k in 1..k_max with the most expected tokens per second."""
    return max(range(1, k_max + 1), key=lambda k: expected_tokens(alpha, k) / (k * draft_s + target_s))


class AdaptiveLength:
    """Running estimates of acceptance and costs; `next()` is the next draft length."""

    def __init__(self, k_start: int = 4, k_max: int = 12, decay: float = 0.9, token_decay: float = 0.95):
        # decay: per step, for the pass times; token_decay: per observed draft token, for the
        # acceptance (a memory of about 20 tokens)
        self.k, self.k_max, self.decay, self.token_decay = k_start, k_max, decay, token_decay
        # pseudo-counts start the acceptance at 0.6 with the weight of a few tokens
        self.kept, self.lost = 3.0, 2.0
        self.draft_s: float | None = None
        self.target_s: float | None = None
        self._proposed_at: float | None = None

    def next(self) -> int:
        if self.draft_s is not None and self.target_s is not None:
            alpha = self.kept / (self.kept + self.lost)
            self.k = best_length(alpha, self.draft_s, self.target_s, self.k_max)
        return self.k

    def drafted(self, n_passes: int, seconds: float) -> None:
        """The draft spent `seconds` on `n_passes` one-token passes (the catch-up excluded)."""
        if n_passes:
            self.draft_s = self._ewma(self.draft_s, seconds / n_passes)
        self._proposed_at = time.perf_counter()

    def verified(self, drafted: int, accepted: int) -> None:
        """The target kept `accepted` of `drafted` chain tokens; the time since the proposal is
        the target's pass (and verification)."""
        if self._proposed_at is not None:
            self.target_s = self._ewma(self.target_s, time.perf_counter() - self._proposed_at)
            self._proposed_at = None
        if drafted:
            # a geometric model's counts: each kept token a success, the first rejection a
            # failure; forgetting goes per observed token, so a long accepted run does not
            # outweigh the rejections that follow it
            rejected = 1 if accepted < drafted else 0
            forget = self.token_decay ** (accepted + rejected)
            self.kept = forget * self.kept + accepted
            self.lost = forget * self.lost + rejected

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new
