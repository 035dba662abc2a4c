"""Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023), tree form.

At a node with target distribution p, the children are tried in order; child x drawn
from draft distribution q is accepted with probability min(1, p(x) / q(x)). On rejection
p becomes norm(max(0, p - q)) and the next child is tried (SpecInfer's multi-step
speculative sampling); when every child is rejected the token is drawn from that
residual ("recovered"), and at a leaf from p itself ("bonus"). With a single child this
is the chain rule. A draft without a distribution has a one-hot q, so it is accepted
with probability p(x) and the residual is p with x removed.
"""
from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..engine.sampling import probabilities, sample
from ..engine.tree import TokenTree
from .base import Verdict, end_kind, register_rule


@register_rule("speculative-sampling")
class SpeculativeSamplingRule:
    name = "speculative-sampling"
    lossless = True

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None,
        position: int | None = None,
    ) -> Verdict:
        node, accepted = 0, []
        while True:
            p = probabilities(target_logits[node], sampling)  # [vocab]
            chosen = None
            for child in tree.children[node]:
                x = tree.tokens[child]
                u = torch.rand((), generator=rng, device=p.device)
                if tree.draft_probs is None:  # deterministic draft, q = one-hot(x): accept with p(x)
                    if u < p[x]:
                        chosen = child
                        break
                    p = _residual_one_hot(p, x)
                    continue
                q = tree.draft_probs[child].to(p.device, torch.float32)
                if q[x] > 0 and u * q[x] < p[x]:  # u < p/q without dividing
                    chosen = child
                    break
                p = _residual(p, q)
            if chosen is None:
                return Verdict(accepted, sample(p, rng), end_kind(tree, node))
            accepted.append(chosen)
            node = chosen

    @staticmethod
    def _draft_q(tree: TokenTree, child: int, p: torch.Tensor) -> torch.Tensor:
        if tree.draft_probs is None:
            return torch.nn.functional.one_hot(torch.tensor(tree.tokens[child], device=p.device), p.shape[-1]).float()
        return tree.draft_probs[child].to(p.device, torch.float32)


def _residual_one_hot(p: torch.Tensor, x: int) -> torch.Tensor:
    """_residual(p, one_hot(x)) without building q: max(0, p - q) is p with p(x) zeroed
    (the same floats, so the same result bit for bit)."""
    r = p.clone()
    r[x] = 0.0
    total = r.sum()
    return r / total if total > 0 else p


def _residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)); if nothing is left (p <= q everywhere) p already equals q, keep p."""
    r = (p - q).clamp_min(0)
    total = r.sum()
    return r / total if total > 0 else p
