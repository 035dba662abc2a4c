"""Coupled sampling (lossless, seeded): the target's token at sequence index i is the Gumbel-max
draw argmax_v(log p(v) + g_i(v)), with g_i keyed by (seed, i) (verispec.engine.sampling).

Each emitted token is a draw from the target's distribution given the tokens before it, as with
speculative sampling, and more: the draw is a function of the seed and the context only, so for a
seed every method emits exactly the tokens `ar` emits. Verification is then a walk like the greedy
one: at each node the target's pick is computed, and the child that drafted it (if any) is
accepted. Drafters that draw with the same noise (SamplingConfig.coupled) guess that pick as often
as their distribution allows.
"""
from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..engine.sampling import gumbel_pick, probabilities
from ..engine.tree import TokenTree
from .base import Verdict, follow_picks, register_rule


@register_rule("gumbel")
class GumbelRule:
    name = "gumbel"
    lossless = True

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None,
        position: int | None = None,
    ) -> Verdict:
        """position: the sequence index of the token that follows the root (len of the committed tokens)."""
        if not sampling.coupled or position is None:
            raise ValueError("the gumbel rule needs coupled sampling (SamplingConfig(coupled=True, seed=...)) "
                             "and the step's position")
        return follow_picks(tree, lambda node, depth: gumbel_pick(
            probabilities(target_logits[node], sampling), sampling.seed, position + depth))
