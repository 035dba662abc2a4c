"""`hybrid`: one token tree from several drafters, verified in one target pass (SAMD-style:
prompt-lookup continuations merged with a tree drafter's tree, by default EAGLE's).

Each step the inner drafter (`base`, default "eagle") proposes its tree and the context's
prompt-lookup matches give up to `matches` continuations. They are merged as a trie union:
a node with the same token under the same parent is one node. Every node gets an estimated
acceptance, the probability that the target accepts it given that its parent was accepted:
  - inner nodes: the drafter's own probability (exp of the score difference along
    TokenTree.scores; EAGLE-2 trees carry them), times a per-depth calibration factor
    measured on this generation's verdicts (accepted / predicted); a tree without scores
    gets the measured per-depth acceptance rate of the inner drafter's nodes;
  - lookup nodes: the measured per-depth acceptance rate of lookup nodes (separately for the
    best match's continuation and for the others);
  - a node both drafted keeps the larger estimate.
A node's score is the product of the estimates along its path (its probability of being
accepted), and the expected tokens of a step with the best n nodes is 1 + their score sum.
The hybrid keeps the n that maximises that over the step's cost, draft_cost + cost(n + 1),
where cost(m) is the target's pass over m nodes relative to a one-node pass (the measured
pass-cost curve; scripts/pass_cost.py measures one) and draft_cost the drafting time in the
same unit (measured by default). A child never outscores its parent, so the best n form a tree.

Lossless as any tree is: deterministic drafts (the default, EAGLE-2 trees are deterministic
given the context) are verified with one-hot q. If the inner drafter samples its tree (a
draft distribution per node), its nodes are kept as drawn (neither merged nor pruned: a
choice that depended on a drawn token would bias the draws) and the lookup nodes join them
as extra siblings after them, with a one-hot q each.

Every protocol call (begin, propose, observe, needs_features) goes to the inner drafter;
observe gets the merged tree and its verdict, as if the inner drafter had proposed it.
"""
from __future__ import annotations

import bisect
import inspect
import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..engine.tree import TokenTree, depths_of
from .base import DraftContext, Drafter, drafter_class, make_drafter, register
from .prompt_lookup import find_continuations

# Target pass over m nodes relative to a one-node pass: smollm2-135m-instruct float32, one
# torch thread, 300 context tokens, binary trees, on this project's 2-core AVX2 machine (CPU
# time, the mean of two rounds over scripts/pass_cost.py's binary trees; float32
# matmuls are much cheaper per row at many rows, but a second row already costs ~1.5x here).
# Pass cost=... for another model, dtype or machine.
DEFAULT_COST = {1: 1.0, 2: 1.47, 4: 1.72, 8: 1.86, 12: 2.07, 16: 2.38, 24: 2.95, 32: 3.48, 48: 4.47}

INNER, LOOKUP_FIRST, LOOKUP_OTHER = 1, 2, 4  # where a node came from (bits)


class PassCost:
    """cost(m): piecewise-linear interpolation of a measured {nodes: relative cost} curve,
    extended linearly past its last point."""

    def __init__(self, curve: dict[int, float] | Sequence[Sequence[float]] | None = None):
        points = sorted((int(n), float(c)) for n, c in (dict(curve) if curve is not None else DEFAULT_COST).items())
        if len(points) < 2 or any(n < 1 or c <= 0 for n, c in points):
            raise ValueError(f"a pass-cost curve needs at least two points {{nodes >= 1: cost > 0}}, got {curve}")
        self.n, self.c = [n for n, _ in points], [c for _, c in points]

    def __call__(self, m: int) -> float:
        i = min(max(bisect.bisect_right(self.n, m) - 1, 0), len(self.n) - 2)
        (n0, n1), (c0, c1) = self.n[i:i + 2], self.c[i:i + 2]
        return max(c0 + (c1 - c0) * (m - n0) / (n1 - n0), 1e-6)


@dataclass
class Source:
    """One drafter's proposal: tokens/parents of a tree rooted at node 0 (the root's entries
    are ignored), each node's estimated acceptance given its parent, and its origin bit.
    mergeable=False: nodes that must stay as drafted (sampled ones): never merged, always kept."""

    tokens: Sequence[int]
    parents: Sequence[int]
    accept: Sequence[float]
    kind: int
    mergeable: bool = True


@dataclass
class Merged:
    tree: TokenTree
    scores: list[float]  # per kept node: estimated probability that it is accepted (root: 1)
    kinds: list[int]  # per kept node: the origin bits of every source that drafted it
    kept_of: list[list[int]] = field(default_factory=list)  # per source: its node -> kept index (-1: dropped)
    expected: float = 1.0  # expected tokens of the step: 1 + the kept scores


def merge_sources(root: int, sources: Sequence[Source], max_nodes: int, cost: PassCost,
                  draft_cost: float = 0.0) -> Merged:
    """Trie union of the sources' trees, then the best nodes by score under the cost curve
    (at most max_nodes drafted nodes, besides those that must stay)."""
    tokens, parents, accept, kinds, fixed = [root], [-1], [1.0], [0], [True]
    edges: dict[tuple[int, int], int] = {}  # (merged parent, token) -> merged node, mergeable nodes only
    where_of = []
    for src in sources:
        where = [0] * len(src.tokens)  # source node -> merged node
        for j in range(1, len(src.tokens)):
            parent, tok, a = where[src.parents[j]], int(src.tokens[j]), min(max(float(src.accept[j]), 0.0), 1.0)
            node = edges.get((parent, tok)) if src.mergeable else None
            if node is None:
                node = len(tokens)
                tokens.append(tok), parents.append(parent), accept.append(a), kinds.append(src.kind)
                fixed.append(not src.mergeable)
                if src.mergeable:
                    edges[(parent, tok)] = node
            else:
                accept[node] = max(accept[node], a)
                kinds[node] |= src.kind
            where[j] = node
        where_of.append(where)
    score = [1.0] * len(tokens)
    for i in range(1, len(tokens)):  # parents come first
        score[i] = score[parents[i]] * accept[i]
    depth = depths_of(parents)
    forced = [i for i in range(1, len(tokens)) if fixed[i]]
    free = sorted((i for i in range(1, len(tokens)) if not fixed[i]), key=lambda i: (-score[i], depth[i], i))
    free = free[:max(0, max_nodes - len(forced))]
    base_tokens = 1.0 + sum(score[i] for i in forced)
    best_n, best_rate, total = 0, base_tokens / (draft_cost + cost(1 + len(forced))), base_tokens
    for n, i in enumerate(free, start=1):
        total += score[i]
        rate = total / (draft_cost + cost(1 + len(forced) + n))
        if rate > best_rate:
            best_n, best_rate = n, rate
    kept = sorted([0, *forced, *free[:best_n]])
    index = {old: new for new, old in enumerate(kept)}
    tree = TokenTree(tuple(tokens[i] for i in kept), tuple(index[parents[i]] if i else -1 for i in kept),
                     scores=tuple(math.log(score[i]) if score[i] > 0 else -math.inf for i in kept))
    kept_of = [[index.get(m, -1) for m in where] for where in where_of]
    return Merged(tree, [score[i] for i in kept], [kinds[i] for i in kept], kept_of,
                  1.0 + sum(score[i] for i in kept[1:]))


class DepthRates:
    """Per-depth running acceptance: hits / trials (lookup) or hits / predicted (a calibration
    factor for scored drafts), starting from a prior worth `weight` trials."""

    def __init__(self, prior: float, weight: float = 2.0):
        self.prior, self.weight = prior, weight
        self.hits: list[float] = []
        self.trials: list[float] = []

    def __getitem__(self, depth: int) -> float:
        if depth >= len(self.hits):
            return self.prior
        return (self.hits[depth] + self.prior * self.weight) / (self.trials[depth] + self.weight)

    def add(self, depth: int, hit: bool, trial: float = 1.0) -> None:
        while len(self.hits) <= depth:
            self.hits.append(0.0), self.trials.append(0.0)
        self.hits[depth] += float(hit)
        self.trials[depth] += trial


@register("hybrid")
class HybridDrafter(Drafter):
    """Options: base (the inner tree drafter's method, default "eagle"), base_options (a dict
    of its options), drafter / draft (passed to the inner drafter: trained heads, a draft
    model), k / max_ngram / min_ngram / matches (prompt lookup: continuation length, suffix
    n-gram sizes, continuations merged), max_nodes (most drafted nodes per step), cost (the
    target's pass-cost curve {nodes: cost relative to one node}; default: smollm2-135m float32
    on this machine), draft_cost (drafting time per step in one-node passes; None: measured),
    lookup_prior (the first lookup estimate per depth, before anything is measured)."""

    def __init__(self, target, base: str = "eagle", base_options: dict | None = None, drafter: str | None = None,
                 draft=None, k: int = 10, max_ngram: int = 3, min_ngram: int = 1, matches: int = 4,
                 max_nodes: int = 32, cost: dict | None = None, draft_cost: float | None = None,
                 lookup_prior: float = 0.5):
        if base == "hybrid":
            raise ValueError("hybrid's base must be another drafter (e.g. eagle, draft-model, medusa)")
        if not (1 <= min_ngram <= max_ngram) or min(k, matches, max_nodes) < 1 or not 0 < lookup_prior < 1:
            raise ValueError("hybrid needs k, matches, max_nodes >= 1, 1 <= min_ngram <= max_ngram and 0 < lookup_prior < 1")
        if draft_cost is not None and draft_cost < 0:
            raise ValueError(f"hybrid's draft_cost must be >= 0 (got {draft_cost})")
        options = dict(base_options or {})
        if drafter is not None:
            options["drafter"] = drafter
        if draft is not None:
            options["draft"] = draft
        if "budget" in _parameters(drafter_class(base)) and "budget" not in options:
            options["budget"] = int(max_nodes)  # the inner tree's extra nodes cost nothing to draft: let the merge choose
        self.inner = make_drafter(base, target, **options)
        self.needs_features = getattr(self.inner, "needs_features", False)
        self.k, self.max_ngram, self.min_ngram, self.matches = int(k), int(max_ngram), int(min_ngram), int(matches)
        self.max_nodes, self.cost = int(max_nodes), PassCost(cost)
        self.fixed_draft_cost = draft_cost
        self.lookup_first, self.lookup_other = DepthRates(lookup_prior), DepthRates(lookup_prior / 2)
        self.inner_scored, self.inner_plain = DepthRates(1.0), DepthRates(0.5)
        self.draft_cost = 0.3 if draft_cost is None else float(draft_cost)
        self._last: tuple[Merged, list[Source], list[float], bool] | None = None
        self._timing: tuple[float, float, int] | None = None  # propose start, end, pass size
        self._steps = 0

    def begin(self, prompt: list[int]) -> None:
        self.inner.begin(prompt)
        self._last, self._timing, self._steps = None, None, 0

    def propose(self, ctx: DraftContext) -> TokenTree:
        start = time.perf_counter()
        inner = self.inner.propose(ctx)
        if inner.aux_tokens:
            raise ValueError(f"hybrid's base {type(self.inner).__name__} drafts auxiliary nodes (lookahead's window), "
                             "which a merged tree cannot carry; use a tree drafter (eagle, draft-model, medusa, recycling)")
        k = min(self.k, ctx.max_depth)
        found = find_continuations(ctx.tokens, k, self.max_ngram, self.min_ngram, self.matches) if k > 0 else []
        sources, raw, scored = self._sources(inner, found)
        merged = merge_sources(ctx.tokens[-1], sources, self.max_nodes, self.cost, self.draft_cost)
        tree = merged.tree
        if inner.draft_probs is not None:  # a sampled inner tree: its q rows, one-hot rows for lookup nodes
            tree = TokenTree(tree.tokens, tree.parents, self._draft_probs(tree, merged, inner), scores=tree.scores)
        self._last = (merged, sources, raw, scored)
        self._timing = (start, time.perf_counter(), len(tree))
        return tree

    def observe(self, tree, target_logits, verdict, new_tokens, features=None) -> None:
        self._steps += 1
        if self._steps > 1:  # the first pass also read the prompt
            self._measure_draft_cost()
        if self._last is not None:
            self._learn(*self._last, verdict)
        self._last = None
        self.inner.observe(tree, target_logits, verdict, new_tokens, features)

    def _sources(self, inner: TokenTree, found: list[list[int]]) -> tuple[list[Source], list[float], bool]:
        """The inner tree and one chain per lookup continuation, with estimated acceptances;
        raw: the inner drafter's own conditional probabilities (1 where it gave none)."""
        depth = inner.depths
        scored = inner.scores is not None
        if scored:  # the drafter's conditional probability, calibrated per depth
            raw = [1.0] + [math.exp(inner.scores[i] - inner.scores[inner.parents[i]]) for i in range(1, len(inner))]
            accept = [r * self.inner_scored[depth[i]] for i, r in enumerate(raw)]
        else:
            raw = [1.0] * len(inner)
            accept = [self.inner_plain[d] for d in depth]
        sources = [Source(inner.tokens, inner.parents, accept, INNER, mergeable=inner.draft_probs is None)]
        for rank, cont in enumerate(found):
            rates = self.lookup_first if rank == 0 else self.lookup_other
            sources.append(Source([-1, *cont], list(range(-1, len(cont))), [1.0] + [rates[d] for d in range(1, len(cont) + 1)],
                                  LOOKUP_FIRST if rank == 0 else LOOKUP_OTHER))
        return sources, raw, scored

    def _learn(self, merged: Merged, sources: list[Source], raw: list[float], scored: bool, verdict) -> None:
        """Update the per-depth estimates from which kept nodes were tested (their parent was
        accepted) and which were accepted. Each kept node counts once per table."""
        on_path = {0, *verdict.accepted}
        parents, depth = merged.tree.parents, merged.tree.depths
        seen: set[tuple[int, int]] = set()
        for src, kept in zip(sources, merged.kept_of):
            for j in range(1, len(kept)):
                node = kept[j]
                if node < 0 or parents[node] not in on_path:
                    continue
                table = (src.kind, node)
                if table in seen:
                    continue
                seen.add(table)
                hit = node in on_path
                if src.kind == INNER and scored:  # calibration: accepted / predicted
                    self.inner_scored.add(depth[node], hit, raw[j])
                elif src.kind == INNER:
                    self.inner_plain.add(depth[node], hit)
                else:
                    (self.lookup_first if src.kind == LOOKUP_FIRST else self.lookup_other).add(depth[node], hit)

    def _measure_draft_cost(self) -> None:
        """Drafting time in one-node target passes: the pass just verified took about cost(n)
        one-node passes, so one such pass took (observe time - propose end) / cost(n)."""
        if self.fixed_draft_cost is not None or self._timing is None:
            return
        start, end, n = self._timing
        self._timing = None
        one_pass = (time.perf_counter() - end) / self.cost(n)
        if one_pass > 0:
            measured = min((end - start) / one_pass, 2.0)
            self.draft_cost += 0.2 * (measured - self.draft_cost)

    @staticmethod
    def _draft_probs(tree: TokenTree, merged: Merged, inner: TokenTree) -> torch.Tensor:
        probs = torch.zeros(len(tree), inner.draft_probs.shape[-1], dtype=inner.draft_probs.dtype,
                            device=inner.draft_probs.device)
        from_inner = {kept: j for j, kept in enumerate(merged.kept_of[0]) if kept > 0}
        for node in range(1, len(tree)):
            if node in from_inner:
                probs[node] = inner.draft_probs[from_inner[node]]
            else:
                probs[node, tree.tokens[node]] = 1.0  # a deterministic (lookup) draft: one-hot q
        return probs


def _parameters(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters)
