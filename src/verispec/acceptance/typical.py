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
from .base import Verdict, end_kind, register_rule


@register_rule("typical")
class TypicalAcceptanceRule:
    name = "typical"
    lossless = False

    def __init__(self, epsilon: float = 0.09, delta: float = 0.3):
        if not (0 < epsilon <= 1 and delta > 0):
            raise ValueError(f"typical acceptance needs 0 < epsilon <= 1 and delta > 0 (got {epsilon}, {delta})")
        self.epsilon, self.delta = float(epsilon), float(delta)

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None,
        position: int | None = None,
    ) -> Verdict:
        p = probabilities(target_logits, sampling)  # [n_nodes, vocab]
        entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
        threshold = torch.clamp(self.delta * torch.exp(-entropy), max=self.epsilon)  # [n_nodes]
        end = _deepest_plausible(tree, p, threshold)
        path = tree.path_to(end)[1:]
        token = int(p[end].argmax()) if sampling.greedy else sample(p[end], rng)
        return Verdict(path, token, end_kind(tree, end))


def _deepest_plausible(tree: TokenTree, p: torch.Tensor, threshold: torch.Tensor) -> int:
    """The deepest node (the first of that depth) whose whole path is plausible, by gather and
    an ancestor-matrix reduction (the cumprod of a chain): one device sync, no per-node loop."""
    device = p.device
    parents = torch.tensor(tree.parents[1:], dtype=torch.long, device=device)
    tokens = torch.tensor(tree.tokens[1:], dtype=torch.long, device=device)
    plausible = torch.ones(len(tree), dtype=torch.bool, device=device)  # the root always is
    plausible[1:] = p[parents, tokens] > threshold[parents]  # gather p(x | parent) per node
    ancestors = tree.ancestor_mask().to(device)  # [n, n], cached per shape
    path_ok = ~(ancestors & ~plausible[None]).any(-1)  # every node on the root path plausible
    depth = torch.tensor(tree.depths, device=device)
    return int(torch.where(path_ok, depth, -1).argmax())  # argmax: the first maximal index
