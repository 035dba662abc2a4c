"""The vectorised hot path gives exactly what the plain per-node code gave: verdicts of every
rule (same RNG draws), tree masks and position ids, ancestor matrices cached per shape."""
from __future__ import annotations

import random

import pytest
import torch

from verispec import SamplingConfig
from verispec.acceptance import GreedyRule, SpeculativeSamplingRule, TypicalAcceptanceRule
from verispec.acceptance.base import Verdict, end_kind
from verispec.engine.sampling import probabilities, sample
from verispec.engine.target import CachedLM
from verispec.engine.tree import TokenTree, ancestor_matrix

V = 7


# --- the per-node reference implementations the vectorised rules replaced ---

def reference_greedy(tree, logits):
    argmax = logits.argmax(-1).tolist()
    node, accepted = 0, []
    while True:
        match = next((c for c in tree.children[node] if tree.tokens[c] == argmax[node]), None)
        if match is None:
            return Verdict(accepted, argmax[node], end_kind(tree, node))
        accepted.append(match)
        node = match


def reference_rejection(tree, logits, sampling, rng):
    node, accepted = 0, []
    while True:
        p = probabilities(logits[node], sampling)
        chosen = None
        for child in tree.children[node]:
            x = tree.tokens[child]
            if tree.draft_probs is None:
                q = torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).float()
            else:
                q = tree.draft_probs[child].float()
            u = torch.rand((), generator=rng)
            if q[x] > 0 and u * q[x] < p[x]:
                chosen = child
                break
            r = (p - q).clamp_min(0)
            p = r / r.sum() if r.sum() > 0 else p
        if chosen is None:
            return Verdict(accepted, sample(p, rng), end_kind(tree, node))
        accepted.append(chosen)
        node = chosen


def reference_typical(tree, logits, sampling, rng, epsilon=0.09, delta=0.3):
    p = probabilities(logits, sampling)
    entropy = -(p * p.clamp_min(1e-30).log()).sum(-1)
    threshold = torch.clamp(delta * torch.exp(-entropy), max=epsilon)
    plausible = [True] + [bool(p[tree.parents[i], tree.tokens[i]] > threshold[tree.parents[i]])
                          for i in range(1, len(tree))]
    ok, best = [False] * len(tree), 0
    for i in range(len(tree)):
        ok[i] = plausible[i] and (i == 0 or ok[tree.parents[i]])
        if ok[i] and tree.depths[i] > tree.depths[best]:
            best = i
    token = int(p[best].argmax()) if sampling.greedy else sample(p[best], rng)
    return Verdict(tree.path_to(best)[1:], token, end_kind(tree, best))


def random_tree(rnd: random.Random, chain: bool, with_probs: bool) -> TokenTree:
    n = rnd.randint(1, 12)
    parents = [-1] + [i - 1 if chain else rnd.randrange(i) for i in range(1, n)]
    tokens = [rnd.randrange(V) for _ in range(n)]
    probs = torch.softmax(torch.randn(n, V), -1) if with_probs else None
    return TokenTree(tuple(tokens), tuple(parents), probs)


def peaked_logits(tree: TokenTree, rnd: random.Random) -> torch.Tensor:
    """Target logits that often agree with the drafts, so that long paths get accepted."""
    logits = torch.randn(len(tree), V)
    for i in range(1, len(tree)):
        if rnd.random() < 0.7:
            logits[tree.parents[i], tree.tokens[i]] += 4.0
    return logits


@pytest.mark.parametrize("chain", [True, False])
def test_greedy_matches_reference(chain):
    rnd = random.Random(0)
    for _ in range(300):
        tree = random_tree(rnd, chain, False)
        logits = peaked_logits(tree, rnd)
        assert GreedyRule().verify(tree, logits, SamplingConfig(), None) == reference_greedy(tree, logits)


@pytest.mark.parametrize("chain,with_probs", [(True, False), (False, False), (True, True), (False, True)])
def test_rejection_matches_reference_draw_for_draw(chain, with_probs):
    rnd = random.Random(1)
    sampling = SamplingConfig(temperature=0.8)
    for seed in range(200):
        tree = random_tree(rnd, chain, with_probs)
        logits = peaked_logits(tree, rnd)
        got = SpeculativeSamplingRule().verify(tree, logits, sampling, torch.Generator().manual_seed(seed))
        assert got == reference_rejection(tree, logits, sampling, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_typical_matches_reference(temperature):
    rnd = random.Random(2)
    sampling = SamplingConfig(temperature=temperature)
    rule = TypicalAcceptanceRule()
    for seed in range(200):
        tree = random_tree(rnd, rnd.random() < 0.3, False)
        logits = peaked_logits(tree, rnd)
        got = rule.verify(tree, logits, sampling, torch.Generator().manual_seed(seed))
        assert got == reference_typical(tree, logits, sampling, torch.Generator().manual_seed(seed))


def test_ancestor_matrix_is_cached_per_shape_and_callers_get_copies():
    parents = (-1, 0, 0, 1, 1, 2)
    a, b = TokenTree((1,) * 6, parents), TokenTree((2,) * 6, parents)
    assert a.ancestor_mask() is b.ancestor_mask()  # one tensor per shape
    copy = ancestor_matrix(list(parents))
    copy[0, 1] = True  # a copy: the cached one is untouched
    assert not a.ancestor_mask()[0, 1]
    expected = torch.zeros(6, 6, dtype=torch.bool)
    for i, p in enumerate(parents):
        expected[i] = expected[p] if p >= 0 else expected[i]
        expected[i, i] = True
    assert torch.equal(a.ancestor_mask(), expected)


def reference_masks(lm: CachedLM, parents, queries, keys, start):
    """The masks as they were built before caching: bool visibility, then additive."""
    visible_tree = ancestor_matrix(parents)[queries][:, keys]
    visible = torch.cat([torch.ones(len(queries), start, dtype=torch.bool), visible_tree], dim=1)
    mask = torch.zeros(visible.shape, dtype=lm.dtype)
    mask.masked_fill_(~visible, torch.finfo(lm.dtype).min)
    return mask[None, None]


def test_cached_tree_masks_equal_the_plain_ones(tiny):
    lm = CachedLM(tiny.model)
    parents = [-1, 0, 0, 1, 1, 2, 5]
    for queries, keys, start in [([1, 2], [0, 1, 2], 9), ([3, 4, 5], [0, 1, 2, 3, 4, 5], 9), ([6], list(range(7)), 30)]:
        for _ in range(2):  # the second call hits the cache
            assert torch.equal(lm._tree_masks(parents, queries, keys, start, None),
                               reference_masks(lm, parents, queries, keys, start))


def test_forward_tree_fast_path_equals_the_general_mask(tiny):
    """The cached-mask pass gives bit-identical logits to the general path's explicit mask."""
    lm = CachedLM(tiny.model)
    context = [3, 14, 15, 92, 65, 35]
    tree = TokenTree((context[-1], 11, 12, 13, 14, 15, 16), (-1, 0, 0, 1, 1, 2, 5))
    lm.extend(context[:-1])
    fast = lm.forward_tree(tree)
    lm.commit([0])
    lm.crop(len(context) - 1)
    base = len(context) - 1
    positions = torch.tensor([base + d for d in tree.depths])[None]
    mask = reference_masks(lm, list(tree.parents), list(range(len(tree))), list(range(len(tree))), base)
    plain = lm._run(torch.tensor(tree.tokens), logits_to_keep=len(tree), position_ids=positions, attention_mask=mask)
    assert torch.equal(fast, plain)
