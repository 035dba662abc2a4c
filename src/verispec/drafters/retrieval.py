"""`retrieval`: REST (He et al. 2023, retrieval-based speculative decoding). The longest suffix
of the context that occurs in a token datastore is looked up; what followed its occurrences
is merged into a trie and the most frequent prefixes, up to a node budget, are drafted.
Drafts are deterministic (one-hot q). Build a datastore with `verispec datastore build`.
"""
from __future__ import annotations

from pathlib import Path

from ..datastore import Datastore
from ..models import tokenizer_identity
from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register
from .ngram_tree import continuation_trie


@register("retrieval")
class Retrieval(Drafter):
    """Options: datastore (a path, or a loaded verispec.datastore.Datastore), budget (drafted
    nodes per step), depth (longest drafted continuation), max_matches (occurrences read per
    step), max_suffix / min_suffix (the context suffix lengths tried; max_suffix defaults to the
    datastore's sort depth, 16 unless built otherwise)."""

    def __init__(self, target, datastore: str | Path | Datastore | None = None, budget: int = 32, depth: int = 8,
                 max_matches: int = 1024, max_suffix: int | None = None, min_suffix: int = 2):
        if datastore is None:
            raise ValueError("method 'retrieval' needs a datastore: pass datastore=PATH (CLI: --option datastore=PATH); "
                             "build one with `verispec datastore build --model MODEL --from FILES... --out PATH`")
        if min(budget, depth, max_matches, min_suffix) < 1 or (max_suffix is not None and max_suffix < min_suffix):
            raise ValueError(f"retrieval needs budget, depth, max_matches, min_suffix >= 1 and max_suffix >= min_suffix "
                             f"(got {budget}, {depth}, {max_matches}, {min_suffix}, {max_suffix})")
        self.store = datastore if isinstance(datastore, Datastore) else Datastore.load(datastore)
        self.store.check_tokenizer(tokenizer_identity(target))
        max_suffix = self.store.sort_depth if max_suffix is None else max_suffix
        if max_suffix > self.store.sort_depth:
            raise ValueError(f"max_suffix {max_suffix} exceeds the datastore's sort depth {self.store.sort_depth}; "
                             "lower it or rebuild the datastore with a larger --sort-depth")
        self.budget, self.depth, self.max_matches = int(budget), int(depth), int(max_matches)
        self.max_suffix, self.min_suffix = int(max_suffix), int(min_suffix)

    def propose(self, ctx: DraftContext) -> TokenTree:
        depth = min(self.depth, ctx.max_depth)
        if depth < 1:
            return TokenTree.chain(ctx.tokens[-1])
        found = self.store.continuations(ctx.tokens, depth, self.max_matches, self.max_suffix, self.min_suffix)
        return continuation_trie(ctx.tokens[-1], found, self.budget, depth)
