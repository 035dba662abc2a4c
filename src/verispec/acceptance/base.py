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


RULES = ("auto", "greedy", "speculative-sampling", "typical")


def choose_rule(sampling: SamplingConfig, name: str = "auto", **options) -> Rule:
    """A rule by name; "auto" is the lossless rule for these sampling settings
    (greedy at temperature 0, speculative sampling otherwise). "typical" is lossy."""
    from .greedy import GreedyRule
    from .rejection import SpeculativeSamplingRule
    from .typical import TypicalAcceptanceRule

    if name == "auto":
        name = "greedy" if sampling.greedy else "speculative-sampling"
    if name == "typical":
        return TypicalAcceptanceRule(**options)
    if options:
        raise ValueError(f"rule {name!r} takes no options (got {', '.join(options)})")
    if name == "greedy":
        if not sampling.greedy:
            raise ValueError("the greedy rule needs temperature 0; use speculative-sampling (or auto) when sampling")
        return GreedyRule()
    if name == "speculative-sampling":
        return SpeculativeSamplingRule()
    raise ValueError(f"unknown rule {name!r}; known rules: {', '.join(RULES)} (typical is lossy)")
