"""The verdict of one verification step and the protocol every rule follows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..config import SamplingConfig
from ..engine.tree import TokenTree

# How the target's own token at the end of a step came about:
#   bonus     - every draft on the accepted path was accepted and the path reached a leaf
#   recovered - drawn (or, greedy, taken) at a rejection
#   target    - nothing was drafted this step (plain autoregressive decoding)
NextKind = Literal["bonus", "recovered", "target"]


@dataclass(frozen=True)
class Verdict:
    accepted: list[int]  # tree node indices accepted, root excluded, root-to-leaf order
    next_token: int
    next_kind: NextKind


class Rule(Protocol):
    name: str
    lossless: bool

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None
    ) -> Verdict:
        """target_logits: [n_nodes, vocab], row i is the target's prediction after node i."""
        ...


def end_kind(tree: TokenTree, node: int) -> NextKind:
    """Kind of the target token emitted after the walk stopped at `node`."""
    if tree.num_drafted == 0:
        return "target"
    return "recovered" if tree.children[node] else "bonus"


def choose_rule(sampling: SamplingConfig) -> Rule:
    """The lossless rule for these sampling settings."""
    from .greedy import GreedyRule
    from .rejection import SpeculativeSamplingRule

    return GreedyRule() if sampling.greedy else SpeculativeSamplingRule()
