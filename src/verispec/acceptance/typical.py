"""Typical acceptance (Medusa, Cai et al. 2024). LOSSY: the output no longer follows the
target's distribution exactly; it trades exactness for longer accepted prefixes.

A drafted token x after a node whose target distribution is p is plausible when
p(x) > min(epsilon, delta * exp(-H(p))). The accepted path is the longest one whose every
token is plausible; the step's own token is then drawn from p at the path's end.
"""
from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..engine.sampling import probabilities, sample
from ..engine.tree import TokenTree
from .base import Verdict, end_kind


class TypicalAcceptanceRule:
    name = "typical"
    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3):
        if not (0 < epsilon <= 1 and delta > 0):
            raise ValueError(f"typical acceptance needs 0 < epsilon <= 1 and delta > 0 (got {epsilon}, {delta})")
        self.epsilon, self.delta = float(epsilon), float(delta)

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None
    ) -> Verdict:
        p = probabilities(target_logits, sampling)  # [n_nodes, vocab]
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)  # [n_nodes]
        plausible = [True] + [
            bool(p[tree.parents[i], tree.tokens[i]] > threshold[tree.parents[i]]) for i in range(1, len(tree))
        ]
        end = _deepest_plausible(tree, plausible)
        path = tree.path_to(end)[1:]
        token = int(p[end].argmax()) if sampling.greedy else sample(p[end], rng)
        return Verdict(path, token, end_kind(tree, end))


def _deepest_plausible(tree: TokenTree, plausible: list[bool]) -> int:
    ok = [False] * len(tree)
    best = 0
    for i in range(len(tree)):  # topological order: a parent's verdict is known first
        ok[i] = plausible[i] and (i == 0 or ok[tree.parents[i]])
        if ok[i] and tree.depths[i] > tree.depths[best]:
            best = i
    return best
