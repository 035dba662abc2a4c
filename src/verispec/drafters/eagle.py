"""`eagle`: an EAGLE head drafts from the target's own features, in EAGLE-2's dynamic trees by
default. The head is EAGLE-3 (Li et al. 2025: the target's low/mid/high hidden states fused,
its own draft vocabulary, trained with the training-time test) where one was trained for the
target, else EAGLE-1 (Li et al. 2024: the last hidden state); `version` picks one.

The head keeps a KV cache over pairs (feature_j, token_{j+1}) of the committed text: the
loop hands observe() the target's features of every token it commits, so after each step
the head catches up on the new pairs, the last of which (feature of the last accepted
token, the new root token) predicts the root's children. Deeper nodes read the feature
the head predicted at their parent. Trees grow through the same CachedLM tree path as a
draft model's, and are dropped from the head's cache after each step.

Options: drafter (a 'verispec train eagle' (EAGLE-3) or 'verispec train eagle1' directory; its
config says which head it holds; default: the model's own, from $VERISPEC_HOME/drafters or the
heads shipped with verispec), version (3 or 1: which of the model's default heads; default 3
where there is one),
tree ("dynamic" (EAGLE-2: depth, top_k, budget), "chain" (k), or a static shape of rank
paths), children (static trees when sampling), draft_vocab (draft over the N tokens most
frequent in the training data only: the LM-head product over 49k tokens is most of a
small head's cost; 0 = the full vocabulary; EAGLE-1 only: an EAGLE-3 head has its own).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..engine.target import CachedLM
from ..engine.tree import TokenTree
from ..heads import drafter_dirs, find_drafter
from ..heads.eagle import load_eagle
from ..heads.eagle3 import is_eagle3_dir, load_eagle3
from ..models import tokenizer_identity
from .base import DraftContext, Drafter, register
from .tree_growth import CHILD_MODES, grow_dynamic, grow_static, static_shape


@register("eagle")
class EagleDrafter(Drafter):
    needs_features = True

    # defaults: the best of the trees measured on smollm2-135m-instruct bf16 on 2 CPU cores
    # (depth 6 / top-4 / 20 nodes accepted more per pass but its pass cost 1.67x a one-token one)
    def __init__(self, target, drafter=None, tree="dynamic", k: int = 4, depth: int = 4, top_k: int = 3,
                 budget: int = 8, children: str = "topk", draft_vocab: int = 8192, version: int | None = None):
        if min(k, depth, top_k, budget) < 1 or draft_vocab < 0:
            raise ValueError("eagle needs k, depth, top_k, budget >= 1 and draft_vocab >= 0")
        if version not in (None, 1, 3):
            raise ValueError(f"eagle version must be 3 (EAGLE-3) or 1 (EAGLE-1), got {version!r}")
        if children not in CHILD_MODES:
            raise ValueError(f"children must be one of {', '.join(CHILD_MODES)}, got {children!r}")
        path = Path(drafter) if drafter else default_head(target, version)
        self.version = 3 if is_eagle3_dir(path) else 1
        if self.version == 3:
            self.head = load_eagle3(path, target)
            self.needs_features = tuple(self.head.layer_ids)  # the target's fused layers, not its last state
        else:
            self.head = load_eagle(path, target.model, tokenizer_identity(target), draft_vocab or None)
        self.lm = CachedLM(self.head)
        self.dynamic = tree == "dynamic"
        chain = [[0] * d for d in range(1, int(k) + 1)]
        self.shape = None if self.dynamic else static_shape(chain if tree in (None, "chain") else tree)
        self.depth, self.top_k, self.budget, self.children = int(depth), int(top_k), int(budget), children

    def begin(self, prompt: list[int]) -> None:
        self.lm.reset()
        self.fed = 0  # pairs (feature_j, token_{j+1}) in the head's cache
        self.unfed: torch.Tensor | None = None  # target features of committed tokens j >= fed, in order
        self.node_hidden: dict[int, torch.Tensor] = {}

    def observe(self, tree, target_logits, verdict, new_tokens, features=None) -> None:
        # only the features not yet in the head's cache are kept: each is fed once
        self.unfed = features if self.unfed is None else torch.cat([self.unfed, features])

    def propose(self, ctx: DraftContext) -> TokenTree:
        n = self.fed + (0 if self.unfed is None else len(self.unfed))  # every committed token but the root
        if ctx.max_depth == 0 or n == 0:  # the first pass (the prompt) gives the first features
            return TokenTree.chain(ctx.tokens[-1])
        root_logits = self._catch_up(ctx.tokens, n)
        self.lm.begin_tree(root_cached=True)
        if self.dynamic:
            tree = grow_dynamic(ctx.tokens[-1], root_logits, self._expand, ctx.max_depth, self.depth, self.top_k,
                                self.budget, sampling=ctx.sampling, start=len(ctx.tokens))
        else:
            tree = grow_static(ctx.tokens[-1], root_logits, self.shape, self._expand, ctx.sampling, ctx.rng,
                               ctx.max_depth, self.children, start=len(ctx.tokens))
        self.lm.crop(self.fed)
        return tree

    def _catch_up(self, tokens: list[int], n: int) -> torch.Tensor:
        """Feed the pairs (feature_j, token_{j+1}) for j = fed .. n-1; logits after the last one."""
        logits = self.lm.extend(tokens[self.fed + 1:n + 1], features=self.unfed[None])[-1]
        self.fed, self.unfed = n, None
        self.node_hidden = {0: self.lm.last_output.hidden[0, -1]}
        return logits

    def _expand(self, tokens: list[int], parents: list[int], nodes: list[int]) -> torch.Tensor:
        feats = torch.stack([self.node_hidden[parents[i]] for i in nodes])
        logits = self.lm.feed_nodes(tokens, parents, nodes, features=feats[None])
        hidden = self.lm.last_output.hidden[0]
        for row, node in enumerate(nodes):
            self.node_hidden[node] = hidden[row]
        return logits


def default_head(target, version: int | None) -> Path:
    """The model's own head: EAGLE-3 where one exists (unless version=1), else EAGLE-1."""
    if version in (None, 3):
        for path in drafter_dirs(target, "eagle3"):
            if (path / "config.json").exists():
                return path
        if version == 3:
            return find_drafter(target, "eagle3", "verispec train eagle")
    return find_drafter(target, "eagle", "verispec train eagle1")
