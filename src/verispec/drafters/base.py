"""The drafter protocol and the method registry."""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..config import SamplingConfig
from ..engine.tree import TokenTree


@dataclass
class DraftContext:
    """What a drafter sees at each step."""

    tokens: list[int]  # committed tokens, prompt included; the last one is the tree root
    max_depth: int  # the deepest draft this step may propose (so output never passes max_new_tokens)
    sampling: SamplingConfig
    rng: torch.Generator | None


class Drafter(ABC):
    # True: the loop captures the target's features (last hidden states after the final
    # norm) and hands observe() those of every token it commits
    needs_features = False

    def begin(self, prompt: list[int]) -> None:
        """Called once before each generation."""

    @abstractmethod
    def propose(self, ctx: DraftContext) -> TokenTree:
        """A tree rooted at ctx.tokens[-1], no deeper than ctx.max_depth."""

    def observe(self, tree: TokenTree, target_logits: torch.Tensor, verdict, new_tokens: list[int],
                features: torch.Tensor | None = None) -> None:
        """After verification: the target's logits over every node of the pass (auxiliary
        nodes included) and what was committed. Drafters that learn from the target use it.
        features (only if needs_features): the target's features of the tokens this pass
        put in its cache, in order: the prompt but its last token (first pass only), the
        tree root, the accepted nodes; every committed token but the newest has one then."""


_REGISTRY: dict[str, Callable[..., Drafter]] = {}


def register(name: str) -> Callable:
    """Class decorator: make the drafter available as method `name`."""

    def wrap(cls):
        _REGISTRY[name] = cls
        cls.method_name = name
        return cls

    return wrap


def methods() -> list[str]:
    return sorted(_REGISTRY)


def make_drafter(method: str, target: Any, **options: Any) -> Drafter:
    """Build the drafter of `method` for a LoadedModel target; options are the method's own."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(methods())}")
    cls = _REGISTRY[method]
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p not in ("self", "target")]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"method {method!r} has no option(s) {', '.join(unknown)}; its options: {', '.join(known) or 'none'}")
    return cls(target, **options)
