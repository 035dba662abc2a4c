"""Greedy verification: follow the children that equal the target's argmax."""
from __future__ import annotations

import torch

from ..config import SamplingConfig
from ..engine.tree import TokenTree
from .base import Verdict, end_kind


class GreedyRule:
    name = "greedy"
    lossless = True

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None
    ) -> Verdict:
        argmax = target_logits.argmax(-1).tolist()  # [n_nodes]: the target's token after each node
        node, accepted = 0, []
        while True:
            match = next((c for c in tree.children[node] if tree.tokens[c] == argmax[node]), None)
            if match is None:
                return Verdict(accepted, argmax[node], end_kind(tree, node))
            accepted.append(match)
            node = match
