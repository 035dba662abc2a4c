"""`lookahead`: Lookahead decoding (Fu et al. 2024, "Break the Sequential Dependency of LLM
Inference Using Lookahead Decoding"). No draft model: the target itself runs Jacobi iterations
on a window of guessed future tokens, in the same pass that verifies n-grams collected from
earlier iterations.

Lookahead branch: a 2D window of N-1 levels by W columns. Level 0 holds guesses for the
positions after the root (its column 0 is the root itself), level j column i sits at
position i + j after the root. Column i's tokens form a causal sequence: the root, level 0
columns 1..i, then levels 1..j of column i; the target's prediction after level N-2
column i is a new guess, one Jacobi iteration further. The window rides along as auxiliary
nodes of the tree (never accepted, dropped at commit).

N-gram pool: every step each column yields the n-gram (level 0, level 1, ..., level N-2,
new guess) read along its diagonal; the pool keeps the G most recent distinct ones per
first token. Verification branch: the pool's n-grams that start with the root, as a trie
under the root. Drafts carry no distribution (one-hot q), so sampling stays lossless.

Everything but propose/observe is plain token-list logic, testable without a model.
"""
from __future__ import annotations

import random
from collections import OrderedDict

import torch

from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register


class NGramPool:
    """n-grams keyed by their first token; the `capacity` most recently seen distinct
    continuations per key, most recent first."""

    def __init__(self, n: int, capacity: int):
        if n < 2 or capacity < 1:
            raise ValueError(f"an n-gram pool needs n >= 2 and capacity >= 1 (got n={n}, capacity={capacity})")
        self.n, self.capacity = n, capacity
        self._by_first: dict[int, OrderedDict[tuple[int, ...], None]] = {}

    def add(self, ngram) -> None:
        ngram = tuple(int(t) for t in ngram)
        if len(ngram) != self.n:
            raise ValueError(f"expected a {self.n}-gram, got {ngram}")
        entries = self._by_first.setdefault(ngram[0], OrderedDict())
        entries.pop(ngram[1:], None)
        entries[ngram[1:]] = None  # most recent last
        while len(entries) > self.capacity:
            entries.popitem(last=False)

    def continuations(self, first: int, limit: int | None = None) -> list[tuple[int, ...]]:
        """The continuations (n-1 tokens) of n-grams starting with `first`, most recent first."""
        found = list(reversed(self._by_first.get(int(first), ())))
        return found if limit is None else found[:limit]

    def __len__(self) -> int:
        return sum(len(e) for e in self._by_first.values())


class JacobiWindow:
    """The lookahead branch: N-1 levels of W guessed tokens (see the module docstring)."""

    def __init__(self, W: int, N: int, levels: list[list[int]]):
        if W < 1 or N < 2:
            raise ValueError(f"lookahead needs W >= 1 and N >= 2 (got W={W}, N={N})")
        if len(levels) != N - 1 or any(len(row) != W for row in levels):
            raise ValueError(f"a lookahead window has {N - 1} levels of {W} tokens")
        self.W, self.N = W, N
        self.levels = [list(map(int, row)) for row in levels]

    @classmethod
    def random(cls, W: int, N: int, context: list[int], rng: random.Random) -> "JacobiWindow":
        """Initial guesses drawn from the context (the paper's initialisation)."""
        return cls(W, N, [[rng.choice(context) for _ in range(W)] for _ in range(N - 1)])

    # Auxiliary-node layout. Level 0 column 0 is the root (tree node 0), not an auxiliary node.
    def aux_cells(self) -> list[tuple[int, int]]:
        """(level, column) of each auxiliary node, in pass order."""
        return [(0, i) for i in range(1, self.W)] + [(j, i) for j in range(1, self.N - 1) for i in range(self.W)]

    def aux_nodes(self, n_tree: int) -> tuple[tuple[int, ...], tuple[int, ...], torch.Tensor]:
        """(tokens, positions relative to the root, visibility [n_aux, n_tree + n_aux]) of the window."""
        cells = self.aux_cells()
        index = {cell: n_tree + a for a, cell in enumerate(cells)}
        visible = torch.zeros(len(cells), n_tree + len(cells), dtype=torch.bool)
        for a, (j, i) in enumerate(cells):
            visible[a, 0] = True  # the root
            for i2 in range(1, i + 1):  # level 0 up to this column: a causal row
                visible[a, index[(0, i2)]] = True
            for j2 in range(1, j + 1):  # this column's own levels
                visible[a, index[(j2, i)]] = True
        tokens = tuple(self.levels[j][i] for j, i in cells)
        positions = tuple(i + j for j, i in cells)
        return tokens, positions, visible

    def output_rows(self, n_tree: int) -> list[int]:
        """Row of the pass's logits whose prediction is column i's new guess, per column."""
        last = self.N - 2
        cells = self.aux_cells()
        return [0 if (last, i) == (0, 0) else n_tree + cells.index((last, i)) for i in range(self.W)]

    def ngrams(self, root: int, new_row: list[int]) -> list[tuple[int, ...]]:
        """The n-gram along each column's diagonal: level 0 (the root in column 0), ..., the new guess."""
        grams = []
        for i in range(self.W):
            column = [root if (j, i) == (0, 0) else self.levels[j][i] for j in range(self.N - 1)]
            grams.append((*column, int(new_row[i])))
        return grams

    def advance(self, new_row: list[int]) -> None:
        """One Jacobi iteration done: drop the oldest level, append the new guesses.

        The window stays anchored to the root, whatever the step committed: its guesses are
        loose about position anyway, and the paper (like llama.cpp's example) keeps the
        trajectory as is. Shifting columns to keep absolute positions measured slightly
        worse (fewer accepted tokens on smollm2-135m), since the shifted-out trajectories are lost.
        """
        self.levels = self.levels[1:] + [list(map(int, new_row))]


def trie(root: int, continuations: list[tuple[int, ...]], max_depth: int) -> TokenTree:
    """The continuations as a prefix tree under the root, each cut to max_depth."""
    tokens, parents = [int(root)], [-1]
    child: dict[tuple[int, int], int] = {}
    for cont in continuations:
        node = 0
        for t in cont[:max_depth]:
            key = (node, int(t))
            if key not in child:
                child[key] = len(tokens)
                tokens.append(int(t))
                parents.append(node)
            node = child[key]
    return TokenTree(tuple(tokens), tuple(parents))


@register("lookahead")
class Lookahead(Drafter):
    """Options: W (window: how many future positions the Jacobi iteration guesses), N (n-gram
    size: levels of trajectory kept + 1), G (n-grams verified per step, and kept per first
    token), seed (initial window guesses).

    Defaults W=5, N=3, G=5 (about 13 tokens per pass), from a measurement on smollm2-135m on a
    CPU (bfloat16): among (W,N,G) = (3,2,3), (3,3,3), (5,3,5), (5,4,5), (7,4,7), accepted tokens
    per pass divided by the measured cost of a pass that wide was best for (3,3,3) and (5,3,5)
    (within noise), and (5,3,5) accepts more; wider windows accept a little more but cost more.
    Where wide passes are nearly free (GPUs), larger W, N, G pay off (the paper uses W=15, N=5)."""

    def __init__(self, target, W: int = 5, N: int = 3, G: int = 5, seed: int = 0):
        for name, value, low in (("W", W, 1), ("N", N, 2), ("G", G, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"lookahead option {name} must be an integer >= {low}, got {value!r}")
        self.W, self.N, self.G, self.seed = W, N, G, int(seed)
        self.window: JacobiWindow | None = None
        self.pool = NGramPool(N, G)
        self.rng = random.Random(self.seed)
        self._window_in_pass = False

    def begin(self, prompt: list[int]) -> None:
        self.rng = random.Random(self.seed)
        self.window = JacobiWindow.random(self.W, self.N, list(prompt), self.rng)
        self.pool = NGramPool(self.N, self.G)

    def propose(self, ctx: DraftContext) -> TokenTree:
        if self.window is None:
            self.begin(ctx.tokens)
        root = ctx.tokens[-1]
        tree = trie(root, self.pool.continuations(root, self.G), ctx.max_depth)
        self._window_in_pass = ctx.max_depth > 0
        if not self._window_in_pass:  # the last token of the generation: nothing left to guess for
            return tree
        tokens, positions, visible = self.window.aux_nodes(len(tree))
        return TokenTree(tree.tokens, tree.parents, aux_tokens=tokens, aux_positions=positions, aux_visible=visible)

    def observe(self, tree: TokenTree, target_logits: torch.Tensor, verdict, new_tokens: list[int],
                features: torch.Tensor | None = None) -> None:
        if not self._window_in_pass or not new_tokens:
            return
        rows = self.window.output_rows(len(tree))
        new_row = target_logits[rows].argmax(-1).tolist()  # one Jacobi iteration (greedy guesses)
        for gram in self.window.ngrams(tree.tokens[0], new_row):
            self.pool.add(gram)
        self.window.advance(new_row)
