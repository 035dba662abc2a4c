"""What the loop calls and hands over: the drafter protocol with its per-step context, and the
verification rule protocol with its verdict. They live with the engine that calls them
(DESIGN.md, "Layering"): drafters and acceptance rules import them from here, the engine
never imports a drafter or a rule."""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from ..config import SamplingConfig
from .tree import TokenTree

# How the target's own token at the end of a step came about:
#   bonus     - every draft on the accepted path was accepted and the path reached a leaf
#   recovered - drawn (or, greedy, taken) at a rejection
#   target    - nothing was drafted this step (plain autoregressive decoding)
NextKind = Literal["bonus", "recovered", "target"]


@dataclass
class DraftContext:
    """What a drafter sees at each step."""

    tokens: list[int]  # committed tokens, prompt included; the last one is the tree root
    max_depth: int  # the deepest draft this step may propose (so output never passes max_new_tokens)
    sampling: SamplingConfig
    rng: torch.Generator | None


@dataclass(frozen=True)
class Verdict:
    accepted: list[int]  # tree node indices accepted, root excluded, root-to-leaf order
    next_token: int
    next_kind: NextKind


class Drafter(ABC):
    # True: the loop captures the target's features (last hidden states after the final
    # norm) and hands observe() those of every token it commits
    needs_features = False

    def begin(self, prompt: list[int]) -> None:
        """Called once before each generation."""

    @abstractmethod
    def propose(self, ctx: DraftContext) -> TokenTree:
        """A tree rooted at ctx.tokens[-1], no deeper than ctx.max_depth."""

    def observe(self, tree: TokenTree, target_logits: torch.Tensor, verdict: Verdict, new_tokens: list[int],
                features: torch.Tensor | None = None) -> None:
        """After verification: the target's logits over every node of the pass (auxiliary
        nodes included) and what was committed. Drafters that learn from the target use it.
        features (only if needs_features): the target's features of the tokens this pass
        put in its cache, in order: the prompt but its last token (first pass only), the
        tree root, the accepted nodes; every committed token but the newest has one then."""


class Rule(Protocol):
    name: str
    lossless: bool

    def verify(
        self, tree: TokenTree, target_logits: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None,
        position: int | None = None,
    ) -> Verdict:
        """target_logits: [n_nodes, vocab], row i is the target's prediction after node i.
        position: the sequence index of the token after the root (rules keyed by position use it)."""
        ...
