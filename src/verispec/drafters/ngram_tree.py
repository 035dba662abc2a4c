"""The trie of several drafted continuations, shared by the retrieval and prompt-lookup drafters."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from ..engine.tree import TokenTree


def continuation_trie(root: int, continuations: Sequence[Sequence[int]] | np.ndarray, budget: int,
                      max_depth: int | None = None) -> TokenTree:
    """Merge continuations of the context (each a token list that would follow `root`) into a
    trie and keep its `budget` most shared nodes as a TokenTree (budget = drafted nodes, root excluded).

    A node's weight is the number of continuations that pass through it. Nodes are kept by
    weight, ties going to the shallower node and then to the node reached first by an earlier
    continuation, so list continuations in order of preference (e.g. most recent first). A
    child never weighs more than its parent and is never shallower, so the kept nodes always
    form a tree. A negative id ends a continuation (padding); depth is cut at max_depth.
    Siblings are distinct tokens, most shared first.
    """
    if budget < 1 or not len(continuations):
        return TokenTree.chain(root)
    if isinstance(continuations, np.ndarray):
        rows = continuations.astype(np.int64, copy=False).reshape(len(continuations), -1)
    else:
        width = max(len(c) for c in continuations)
        rows = np.full((len(continuations), width), -1, dtype=np.int64)
        for i, c in enumerate(continuations):
            rows[i, :len(c)] = c
    if max_depth is not None:
        rows = rows[:, :max(0, max_depth)]
    alive = np.cumprod(rows >= 0, axis=1).astype(bool)  # [n_rows, depth]: row still going at this depth
    base = int(rows.max(initial=0)) + 1
    node_of_row = np.zeros(len(rows), dtype=np.int64)  # trie node each row has reached (0 = root)
    n_nodes = 1
    parent, token, weight, depth, first_row = [], [], [], [], []
    for d in range(rows.shape[1]):
        live = np.flatnonzero(alive[:, d])
        if not live.size:
            break
        keys = node_of_row[live] * base + rows[live, d]  # one key per (parent node, token) edge
        uniq, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
        ids = n_nodes + np.arange(len(uniq))
        parent.append(uniq // base)
        token.append(uniq % base)
        weight.append(counts)
        depth.append(np.full(len(uniq), d + 1))
        first_row.append(live[first])  # `live` is ascending, so this is the earliest row through the node
        node_of_row[live] = ids[inverse.reshape(-1)]
        n_nodes += len(uniq)
    if n_nodes == 1:
        return TokenTree.chain(root)
    parent, token, weight, depth, first_row = map(np.concatenate, (parent, token, weight, depth, first_row))
    best = np.lexsort((first_row, depth, -weight))[:budget]  # last key is the primary one
    order = best[np.lexsort((first_row[best], -weight[best], depth[best]))]  # breadth-first, most shared first
    new_index = np.zeros(n_nodes, dtype=np.int64)  # trie node id -> tree index (root stays 0)
    new_index[order + 1] = np.arange(1, len(order) + 1)
    return TokenTree((int(root), *token[order].tolist()), (-1, *new_index[parent[order]].tolist()))
