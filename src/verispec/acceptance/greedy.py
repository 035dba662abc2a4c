"""Greedy verification: follow the children that equal the target's argmax."""
from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..engine.tree import TokenTree
from .base import Verdict, end_kind, follow_picks, register_rule


@register_rule("greedy")
class GreedyRule:
    name = "greedy"
    lossless = True

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None,
        position: int | None = None,
    ) -> Verdict:
        argmax = target_logits.argmax(-1)  # [n_nodes]: the target's token after each node
        if tree.is_chain:  # chain fast path: the accepted drafts are the longest prefix that matches
            drafts = torch.tensor(tree.tokens[1:], dtype=torch.long, device=argmax.device)
            n_ok = (drafts == argmax[:-1]).cumprod(0).sum()
            n_ok, token = torch.stack([n_ok, argmax[n_ok]]).tolist()  # the step's one device sync
            return Verdict(list(range(1, n_ok + 1)), token, end_kind(tree, n_ok))
        argmax = argmax.tolist()  # one sync; the walk is over at most depth + 1 nodes
        return follow_picks(tree, lambda node, depth: argmax[node])
