"""`recycling`: Token Recycling (Luo et al. 2024). Every verification pass computes the target's
next-token distribution at every tree node; its top-k tokens are "recycled" into an adjacency
matrix [vocab, k] (row t: the latest top-k successors the target predicted after token t). A
static tree is drafted from it: a node of rank r holds the r-th successor of its parent's
token. Tokens without a row yet get no children. Drafts are deterministic (one-hot q).

The matrix starts empty and persists across generations (a "hot start": the target's
predictions stay valid whatever the prompt); persist=False resets it for every generation.
Warm start (our addition, warm_start=True): at the start of each generation, prompt tokens
that have no row yet get the token that followed them in the prompt as their only (rank 0)
successor; the target's own rows overwrite these as soon as it has seen the token.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register
from .tree_growth import static_shape

EMPTY = -1  # an adjacency slot with no successor


def default_tree(nodes: int = 64, depth: int = 6, k: int = 8) -> list[list[int]]:
    """A static shape of `nodes` rank paths that maximises the expected number of accepted
    tokens, if the rank-r successor is right with probability RANK_ACCEPT[r] independently at
    every depth (best-first growth of the path-probability product; ties to the earlier path)."""
    probs = RANK_ACCEPT[:k]
    chosen: list[tuple[int, ...]] = []
    frontier = {(r,): probs[r] for r in range(len(probs))}
    while frontier and len(chosen) < nodes:
        path = max(frontier, key=lambda p: (frontier[p], [-r for r in p]))
        score = frontier.pop(path)
        chosen.append(path)
        if len(path) < depth:
            frontier.update({path + (r,): score * probs[r] for r in range(len(probs))})
    return [list(p) for p in chosen]


# How often the target's next token was the r-th recycled successor of the root's token (given a
# row), measured on smollm2-135m-instruct over 3 Spec-Bench questions (~400 steps), smoothed;
# only the shape of the default tree depends on it.
RANK_ACCEPT = (0.40, 0.08, 0.06, 0.03, 0.02, 0.015, 0.012, 0.01)


@register("recycling")
class Recycling(Drafter):
    """Options: k (successors kept per token), tree (static shape as a list of rank paths; default
    default_tree(nodes)), nodes (size of the default shape: 24, since on a CPU a target pass over
    24 new tokens already costs ~1.5x one over a single token; GPUs afford the paper's ~64), warm_start (prompt bigrams fill empty rows), persist
    (keep the matrix across generations)."""

    def __init__(self, target, k: int = 8, tree: Sequence[Sequence[int]] | None = None, nodes: int = 24,
                 warm_start: bool = True, persist: bool = True):
        if k < 1:
            raise ValueError(f"recycling needs k >= 1, got {k}")
        tree = default_tree(nodes=nodes, k=k) if tree is None else tree
        parents, ranks = static_shape(tree)
        if max(ranks) >= k:
            raise ValueError(f"the tree uses successor rank {max(ranks)}, but only k={k} successors are kept per token")
        self.device = next(target.model.parameters()).device
        self.vocab = int(target.model.config.vocab_size)
        self.k, self.warm_start, self.persist = int(k), bool(warm_start), bool(persist)
        self.adjacency = torch.full((self.vocab, self.k), EMPTY, dtype=torch.long, device=self.device)  # [vocab, k]
        # The shape, level by level (static_shape orders nodes by depth, so each level is a slice).
        self.parents = np.asarray(parents)
        depths = np.zeros(len(parents), dtype=np.int64)
        for i in range(1, len(parents)):
            depths[i] = depths[parents[i]] + 1
        self.depths = depths
        self.levels = []  # (first node, end node, parent index [level], rank [level]) per depth >= 1
        for d in range(1, int(depths.max()) + 1):
            nodes = np.flatnonzero(depths == d)
            self.levels.append((int(nodes[0]), int(nodes[-1]) + 1,
                                torch.as_tensor(self.parents[nodes], device=self.device),
                                torch.as_tensor(np.asarray(ranks)[nodes], device=self.device)))

    def begin(self, prompt: list[int]) -> None:
        if not self.persist:
            self.adjacency.fill_(EMPTY)
        if self.warm_start and len(prompt) > 1:
            pairs = torch.as_tensor(prompt, dtype=torch.long, device=self.device)
            first, then = pairs[:-1], pairs[1:]
            # the latest occurrence of each token wins: keep, per token, its last position
            last = _last_occurrence(first)
            first, then = first[last], then[last]
            empty = self.adjacency[first, 0] == EMPTY
            self.adjacency[first[empty], 0] = then[empty]

    def propose(self, ctx: DraftContext) -> TokenTree:
        depth = min(len(self.levels), ctx.max_depth)
        end = self.levels[depth - 1][1] if depth > 0 else 1
        tokens = torch.full((end,), EMPTY, dtype=torch.long, device=self.device)
        tokens[0] = ctx.tokens[-1]
        for first, stop, parent, rank in self.levels[:depth]:
            parent_tokens = tokens[parent]
            children = self.adjacency[parent_tokens.clamp_min(0), rank]
            tokens[first:stop] = children.masked_fill(parent_tokens == EMPTY, EMPTY)
        tokens = tokens.cpu().numpy()
        keep = np.flatnonzero(tokens != EMPTY)  # a node without a token takes its subtree with it
        new_index = np.cumsum(tokens != EMPTY) - 1
        parents = np.where(keep == 0, -1, new_index[self.parents[keep]])
        return TokenTree(tuple(tokens[keep].tolist()), tuple(parents.tolist()))

    def observe(self, tree: TokenTree, target_logits: torch.Tensor, verdict, new_tokens: list[int],
                features: torch.Tensor | None = None) -> None:
        """Row t of the matrix <- the target's top-k after every node holding token t. When a
        token sits at several nodes, the accepted path's (its context is the true one) wins."""
        n = len(tree)
        on_path = [0, *verdict.accepted]
        off_path = sorted(set(range(n)) - set(on_path))
        order = torch.as_tensor(off_path + on_path, device=self.device)  # later writes win
        tokens = torch.as_tensor(tree.tokens, device=self.device)[order]
        last = _last_occurrence(tokens)
        rows = order[last]
        k = min(self.k, target_logits.shape[-1])
        top = torch.topk(target_logits[:n], k, dim=-1).indices  # [n_nodes, k]; a view, no copy of the logits
        self.adjacency[tokens[last], :k] = top.to(self.device)[rows]


def _last_occurrence(values: torch.Tensor) -> torch.Tensor:
    """Indices of the last occurrence of each distinct value in a 1-D tensor."""
    unique, inverse = torch.unique(values, return_inverse=True)
    positions = torch.arange(len(values), device=values.device)
    last = torch.full((len(unique),), -1, dtype=torch.long, device=values.device)
    return last.scatter_reduce(0, inverse, positions, reduce="amax")
