"""TokenTree: the draft a drafter proposes and the target verifies in one pass.

Node 0 is the root: the last committed token, whose key/value the target has not cached
yet. Every other node is a drafted token whose parent index is smaller than its own, so
the node list is already in topological order. A chain of k drafts is the tree
parents = [-1, 0, 1, ..., k-1]; plain autoregressive decoding is the root alone.

Auxiliary nodes (optional) ride along in the same target pass but are never verified or
accepted: Lookahead decoding's Jacobi window is one. They come after the tree in the pass,
at explicit positions (relative to the root's) and with explicit visibility; tree nodes
never see them, and commit drops them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property, lru_cache

import numpy as np
import torch


@dataclass(frozen=True)
class TokenTree:
    tokens: tuple[int, ...]
    parents: tuple[int, ...]
    # Per drafted node, the draft distribution q its token was drawn from (the drafter's
    # distribution at its parent), [n_nodes, vocab]; row 0 is unused. None means the
    # drafter had no distribution (deterministic drafts: q is one-hot on the token).
    draft_probs: torch.Tensor | None = field(default=None, compare=False)
    aux_tokens: tuple[int, ...] = ()
    aux_positions: tuple[int, ...] = ()  # relative to the root's position
    # [n_aux, n_nodes + n_aux] bool: which tree and auxiliary nodes each auxiliary node sees
    # (the cached context is always visible)
    aux_visible: torch.Tensor | None = field(default=None, compare=False)
    # Optional, per node: the drafter's log-probability of the path from the root to the node
    # (EAGLE-2's score; the root's is 0). Drafters that merge trees rank nodes by it.
    scores: tuple[float, ...] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if len(self.tokens) != len(self.parents) or not self.tokens:
            raise ValueError("a TokenTree needs a root and one parent index per token")
        if self.parents[0] != -1 or any(not 0 <= p < i for i, p in enumerate(self.parents) if i):
            raise ValueError(f"parents must be -1 for the root and point to an earlier node: {self.parents}")
        n_aux = len(self.aux_tokens)
        if n_aux and (len(self.aux_positions) != n_aux or self.aux_visible is None
                      or tuple(self.aux_visible.shape) != (n_aux, len(self.tokens) + n_aux)):
            raise ValueError("auxiliary nodes need one position each and aux_visible of shape [n_aux, n_nodes + n_aux]")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            raise ValueError("scores need one value per node")

    @classmethod
    def chain(cls, root: int, drafts: list[int] | tuple[int, ...] = (), draft_probs: torch.Tensor | None = None) -> "TokenTree":
        tokens = (int(root), *map(int, drafts))
        return cls(tokens, tuple(range(-1, len(tokens) - 1)), draft_probs)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_drafted(self) -> int:
        return len(self.tokens) - 1

    @cached_property
    def is_chain(self) -> bool:
        """A plain chain (no auxiliary nodes): causal attention is exactly its mask."""
        return not self.aux_tokens and all(p == i - 1 for i, p in enumerate(self.parents))

    @cached_property
    def depths(self) -> tuple[int, ...]:
        return _depths(self.parents)

    @cached_property
    def children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in self.tokens]
        for i in range(1, len(self.tokens)):
            kids[self.parents[i]].append(i)
        return tuple(tuple(k) for k in kids)

    def path_to(self, node: int) -> list[int]:
        """Node indices from the root to `node`, both included."""
        path = []
        while node != -1:
            path.append(node)
            node = self.parents[node]
        return path[::-1]

    def leaf_paths(self) -> list[list[int]]:
        return [self.path_to(i) for i, kids in enumerate(self.children) if not kids]

    def ancestor_mask(self) -> torch.Tensor:
        """[n, n] bool: entry (i, j) is True when node j is node i or one of its ancestors.
        Shared by every tree of this shape: read it, never write it."""
        return shared_ancestor_matrix(self.parents)


def depths_of(parents) -> list[int]:
    """Depth of every node of a topologically ordered parent list (the root's is 0)."""
    return list(_depths(tuple(parents)))


def ancestor_matrix(parents) -> torch.Tensor:
    """[n, n] bool ancestor-or-self matrix of a topologically ordered parent list (a new tensor)."""
    return shared_ancestor_matrix(parents).clone()


def shared_ancestor_matrix(parents) -> torch.Tensor:
    """ancestor_matrix, cached per tree shape: the same tensor for every tree of these parents
    (static trees, and dynamic ones that repeat a shape, build it once). Read it, never write it."""
    return _ancestors(tuple(parents))


@lru_cache(maxsize=1024)
def _depths(parents: tuple[int, ...]) -> tuple[int, ...]:
    depths = [0] * len(parents)
    for i in range(1, len(parents)):
        depths[i] = depths[parents[i]] + 1
    return tuple(depths)


@lru_cache(maxsize=1024)
def _ancestors(parents: tuple[int, ...]) -> torch.Tensor:
    n = len(parents)
    mask = np.zeros((n, n), dtype=bool)
    for i, p in enumerate(parents):
        if p >= 0:
            mask[i] = mask[p]  # a node sees what its parent sees, plus itself
        mask[i, i] = True
    return torch.from_numpy(mask)
