"""Growing draft token trees from a drafter's next-token logits.

Shared by every drafter that can score tree nodes (draft models, Medusa and EAGLE heads):
the drafter supplies `expand(tokens, parents, nodes) -> logits [len(nodes), vocab]`, the
logits after each of the given (just added) nodes.

- static: a fixed shape given as Medusa-style paths of ranks, e.g. [[0], [1], [0, 0]]:
  node [0, 1] is the second candidate after the first candidate of the root.
- dynamic: EAGLE-2. Expand the `top_k` nodes with the highest cumulative draft
  log-probability at each depth, then keep the `budget` best nodes by that score.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..config import SamplingConfig
from ..engine.sampling import gumbel_scores, probabilities
from ..engine.tree import TokenTree, depths_of

Expand = Callable[[list[int], list[int], list[int]], torch.Tensor]
CHILD_MODES = ("topk", "sample", "sample-unique")


def static_shape(paths: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Paths of ranks -> (parents, ranks) of the shape's nodes, root first, level by level."""
    def is_rank(r) -> bool:
        return isinstance(r, int) and not isinstance(r, bool) and r >= 0
    if (not isinstance(paths, (list, tuple)) or not paths
            or any(not isinstance(p, (list, tuple)) or not p or not all(map(is_rank, p)) for p in paths)):
        raise ValueError(f"a static tree is a list of non-empty paths of ranks >= 0, e.g. [[0], [1], [0, 0]]; "
                         f"got {paths!r}")
    cleaned = sorted({tuple(p) for p in paths}, key=lambda p: (len(p), p))
    index = {(): 0}
    parents, ranks = [-1], [0]
    for path in cleaned:
        if path[:-1] not in index:
            raise ValueError(f"static tree path {list(path)} has no parent path {list(path[:-1])}")
        index[path] = len(parents)
        parents.append(index[path[:-1]])
        ranks.append(path[-1])
    return parents, ranks


def grow_static(
    root: int, root_logits: torch.Tensor, shape: tuple[list[int], list[int]], expand: Expand,
    sampling: SamplingConfig, rng: torch.Generator | None, max_depth: int, children: str = "topk", *, start: int,
) -> TokenTree:
    """Fill a static shape with tokens, one expand() per level for the nodes that have children.
    start: the sequence index of the root's children (coupled sampling keys its noise by it)."""
    if children not in CHILD_MODES:
        raise ValueError(f"children must be one of {', '.join(CHILD_MODES)}, got {children!r}")
    if sampling.greedy:
        children = "topk"  # sampling from a one-hot distribution would only repeat the argmax
    elif sampling.coupled:
        children = "coupled"  # the target picks with known noise: rank children by the same perturbed scores
    shape_parents, ranks = _truncate(shape, max_depth)
    depth = depths_of(shape_parents)
    kids = [[] for _ in shape_parents]
    for i in range(1, len(shape_parents)):
        kids[shape_parents[i]].append(i)
    tokens, qs = [root] + [0] * (len(shape_parents) - 1), [None] * len(shape_parents)
    logits_at = {0: root_logits}
    level = [0]
    while level:
        for node in level:
            _fill_children(node, kids[node], ranks, logits_at[node], tokens, qs, sampling, rng, children,
                           start + depth[node])
        next_level = [c for node in level for c in kids[node]]
        inner = [c for c in next_level if kids[c]]
        if inner:
            logits_at.update(zip(inner, expand(tokens, shape_parents, inner)))
        level = inner
    probs = None
    if children not in ("topk", "coupled") and len(qs) > 1:
        qs[0] = torch.zeros_like(qs[1])  # the root is not drafted
        probs = torch.stack(qs)
    return TokenTree(tuple(tokens), tuple(shape_parents), probs)


def _truncate(shape, max_depth: int) -> tuple[list[int], list[int]]:
    parents, ranks = shape
    depth = [0] * len(parents)
    keep = [0]
    for i in range(1, len(parents)):
        depth[i] = depth[parents[i]] + 1
        if depth[i] <= max_depth:
            keep.append(i)
    remap = {old: new for new, old in enumerate(keep)}
    return [-1] + [remap[parents[i]] for i in keep[1:]], [ranks[i] for i in keep]


def _fill_children(node, kid_nodes, ranks, logits, tokens, qs, sampling, rng, mode, index) -> None:
    if not kid_nodes:
        return
    if mode in ("topk", "coupled"):
        scores = logits.float() if mode == "topk" else gumbel_scores(probabilities(logits, sampling), sampling.seed, index)
        top = torch.topk(scores, max(ranks[c] for c in kid_nodes) + 1).indices.tolist()
        for c in kid_nodes:
            tokens[c] = top[ranks[c]]
        return
    q = probabilities(logits, sampling)
    for c in kid_nodes:  # with replacement: every sibling drawn from q; without: q loses drawn tokens
        if q.sum() <= 0:  # fewer candidates than siblings: q = 0 makes the rule skip this child
            tokens[c], qs[c] = tokens[node], q
            continue
        tokens[c] = int(torch.multinomial(q, 1, generator=rng))
        qs[c] = q
        if mode == "sample-unique":
            q = q.clone()
            q[tokens[c]] = 0
            q = q / q.sum() if q.sum() > 0 else q


def grow_dynamic(
    root: int, root_logits: torch.Tensor, expand: Expand, max_depth: int, depth: int, top_k: int, budget: int,
    *, sampling: SamplingConfig, start: int,
) -> TokenTree:
    """EAGLE-2 tree: score = cumulative draft log-probability; expand the best top_k per level.
    The tree carries each node's score (TokenTree.scores) for drafters that merge trees.
    start: the sequence index of the root's children. Under coupled sampling a level's
    log-probabilities are those of the perturbed scores log q + g of its index: the target
    picks by them."""
    coupled = sampling.coupled and not sampling.greedy
    tokens, parents, scores = [root], [-1], [0.0]
    frontier, frontier_scores, frontier_logits = [0], torch.zeros(1, dtype=torch.float64), root_logits[None]
    levels = min(depth, max_depth)
    for level in range(levels):
        level_logp = torch.log_softmax(  # a level's nodes share one sequence index, so one noise row
            gumbel_scores(probabilities(frontier_logits, sampling), sampling.seed, start + level) if coupled
            else frontier_logits.float(), -1)
        top = torch.topk(level_logp, top_k, dim=-1)  # [frontier, top_k]
        # float64 sums of the float32 log-probabilities: the same numbers Python floats would give
        level_scores = (frontier_scores.to(top.values.device)[:, None] + top.values.double()).flatten()
        order = torch.sort(-level_scores, stable=True).indices[:top_k]  # ties: the earlier candidate
        first = len(tokens)
        new_tokens, new_scores, best = (t.tolist() for t in (top.indices.flatten(), level_scores, order))  # one sync
        tokens += new_tokens
        parents += [node for node in frontier for _ in range(top_k)]
        scores += new_scores
        frontier, frontier_scores = [first + i for i in best], level_scores[order].cpu()
        if level + 1 < levels:
            frontier_logits = expand(tokens, parents, frontier)
    return _best_subtree(tokens, parents, scores, budget)


def _best_subtree(tokens, parents, scores, budget: int) -> TokenTree:
    """Keep the root and the `budget` best nodes; a child never outscores its parent, so
    ranking by (score, depth) keeps every kept node's ancestors."""
    depth = depths_of(parents)
    ranked = sorted(range(1, len(tokens)), key=lambda i: (-scores[i], depth[i], i))
    kept: set[int] = {0}
    for i in ranked:
        if len(kept) > budget:
            break
        if parents[i] in kept:
            kept.add(i)
    order = sorted(kept)
    remap = {old: new for new, old in enumerate(order)}
    return TokenTree(tuple(tokens[i] for i in order), tuple(remap[parents[i]] if i else -1 for i in order),
                     scores=tuple(scores[i] for i in order))
