"""`ar`: plain autoregressive decoding, the baseline, run through the same loop."""
from __future__ import annotations

from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register


@register("ar")
class Autoregressive(Drafter):
    def __init__(self, target):
        pass

    def propose(self, ctx: DraftContext) -> TokenTree:
        return TokenTree.chain(ctx.tokens[-1])
