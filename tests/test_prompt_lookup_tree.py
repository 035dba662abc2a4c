"""Prompt-lookup trees: the trie of several matches' continuations under a node budget
(drafters/ngram_tree.py, shared with retrieval) and prompt-lookup's tree_width option."""
from __future__ import annotations

import inspect
import random

import numpy as np
import pytest
import torch

from verispec import SpeculativeGenerator
from verispec.config import SamplingConfig
from verispec.drafters import prompt_lookup
from verispec.drafters.base import DraftContext, make_drafter
from verispec.drafters.ngram_tree import continuation_trie
from verispec.engine.sampling import probabilities
from conftest import hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

PROMPTS = [[5, 17, 33, 2, 8, 61, 5, 17], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [42], [9, 9, 9, 9, 10, 11, 9, 9],
           [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4, 6, 2, 6, 4, 3, 3, 8, 3, 2, 7, 9, 5, 3]]

has_tree_option = "tree_width" in inspect.signature(prompt_lookup.PromptLookup.__init__).parameters
needs_tree_option = pytest.mark.skipif(not has_tree_option, reason="prompt_lookup.py has no tree_width option yet")


def paths(tree) -> list[tuple[int, ...]]:
    return [tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(1, len(tree))]


# --- the trie ---------------------------------------------------------------------------------

def test_trie_merges_shared_prefixes():
    tree = continuation_trie(9, [[1, 2, 3], [1, 2, 4], [1, 5], [6]], budget=10)
    assert tree.tokens[0] == 9 and tree.parents[0] == -1
    assert sorted(paths(tree)) == sorted([(1,), (1, 2), (1, 2, 3), (1, 2, 4), (1, 5), (6,)])
    assert paths(tree)[:2] == [(1,), (6,)]  # breadth-first, the most shared sibling first


def test_budget_keeps_the_most_shared_nodes_preferring_shallow_then_early():
    conts = [[1, 2, 3], [1, 2, 4], [1, 5], [6, 7]]
    # weights: 1:3, 1-2:2, then weight 1 at depth 1 (6), depth 2 (1-5, 6-7), depth 3 (1-2-3, 1-2-4)
    assert sorted(paths(continuation_trie(9, conts, budget=2))) == [(1,), (1, 2)]
    assert sorted(paths(continuation_trie(9, conts, budget=3))) == [(1,), (1, 2), (6,)]
    assert sorted(paths(continuation_trie(9, conts, budget=4))) == [(1,), (1, 2), (1, 5), (6,)]  # earlier row first
    assert sorted(paths(continuation_trie(9, conts, budget=6))) == [(1,), (1, 2), (1, 2, 3), (1, 5), (6,), (6, 7)]


def test_padding_depth_and_empty_inputs():
    padded = np.array([[1, 2, -1, 7], [1, 3, 4, -1]])  # a negative id ends a row
    assert sorted(paths(continuation_trie(0, padded, 10))) == [(1,), (1, 2), (1, 3), (1, 3, 4)]
    assert sorted(paths(continuation_trie(0, [[1, 2, 3], [4]], 10, max_depth=1))) == [(1,), (4,)]
    for empty in ([], [[]], np.zeros((3, 0), dtype=np.int64), np.full((2, 3), -1)):
        assert continuation_trie(5, empty, 10).tokens == (5,)
    assert continuation_trie(5, [[1]], 0).tokens == (5,)
    assert continuation_trie(5, [[1, 2, 3]], 10) == continuation_trie(5, [[1, 2, 3]] * 4, 10)  # a chain


@pytest.mark.parametrize("seed", range(20))
def test_trie_is_the_top_budget_prefixes_by_count(seed):
    rng = random.Random(seed)
    conts = [[rng.randrange(3) for _ in range(rng.randrange(1, 6))] for _ in range(rng.randrange(1, 12))]
    budget = rng.randrange(1, 15)
    tree = continuation_trie(0, conts, budget)
    count: dict[tuple, int] = {}
    first: dict[tuple, int] = {}
    for row, c in enumerate(conts):
        for d in range(1, len(c) + 1):
            prefix = tuple(c[:d])
            count[prefix] = count.get(prefix, 0) + 1
            first.setdefault(prefix, row)
    expected = sorted(count, key=lambda p: (-count[p], len(p), first[p]))[:budget]
    got = paths(tree)
    assert sorted(got) == sorted(expected) and len(set(got)) == len(got)
    for i, p in enumerate(tree.parents[1:], start=1):  # siblings are distinct tokens
        assert [tree.tokens[c] for c in tree.children[p]].count(tree.tokens[i]) == 1


# --- prompt lookup's tree option -----------------------------------------------------------------

@needs_tree_option
def test_find_continuations_most_recent_and_longest_first():
    seq = [7, 1, 2, 3, 8, 1, 2, 4, 9, 5, 2, 6, 1, 2]
    # "1 2" (n = 2) occurs at 1 and 5; then "2" (n = 1) adds the match at 10
    assert prompt_lookup.find_continuations(seq, 2, 3, 1, max_matches=5) == [[4, 9], [3, 8], [6, 1]]
    assert prompt_lookup.find_continuations(seq, 2, 3, 1, max_matches=2) == [[4, 9], [3, 8]]
    assert prompt_lookup.find_continuations(seq, 2, 3, 2, max_matches=5) == [[4, 9], [3, 8]]
    assert prompt_lookup.find_continuation(seq, 2, 3, 1) == [4, 9]
    assert prompt_lookup.find_continuations([1, 2, 3], 2, 3, 1, max_matches=4) == []


@needs_tree_option
def test_tree_merges_matches_under_the_budget():
    seq = [7, 1, 2, 3, 8, 1, 2, 4, 9, 5, 2, 6, 1, 2]
    drafter = make_drafter("prompt-lookup", tiny_llama(), k=3, tree_width=4, budget=5)
    tree = drafter.propose(DraftContext(seq, 10, SamplingConfig(), None))
    assert tree.tokens[0] == 2 and len(tree) == 6
    assert paths(tree)[:3] == [(4,), (3,), (6,)]  # weight 1 each: the most recent, longest match first
    chain = make_drafter("prompt-lookup", tiny_llama(), k=3)
    assert chain.propose(DraftContext(seq, 10, SamplingConfig(), None)).tokens == (2, 4, 9, 5)


@needs_tree_option
@pytest.mark.parametrize("options", [{"tree_width": 4}, {"tree_width": 8, "budget": 6, "k": 4},
                                     {"tree_width": 3, "max_ngram": 1, "min_ngram": 1}])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_tree_greedy_output_equals_hf_generate(tiny, prompt, options):
    ref = hf_greedy(tiny, prompt, 48)
    out = SpeculativeGenerator(tiny, method="prompt-lookup", **options).generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref


@needs_tree_option
def test_tree_sampling_matches_target_joint_distribution():
    target = tiny_llama(vocab=6, seed=3)
    prompt, sampling = [1, 2, 0, 2, 4, 3, 2, 5, 1, 2], SamplingConfig(temperature=1.0)
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)
        batch = torch.cat([torch.tensor([prompt]).expand(6, -1), torch.arange(6)[:, None]], 1)
        p2 = probabilities(target.model(batch).logits[:, -1], sampling)  # [6, 6]
    exact = (p1[:, None] * p2).flatten()
    gen = SpeculativeGenerator(target, method="prompt-lookup", k=3, tree_width=4)
    assert len(gen.drafter.propose(DraftContext(prompt, 1, sampling, None))) == 4  # siblings 0, 4, 5
    counts = torch.zeros(36)
    # enough draws to catch a second token verified against the wrong context (stat_power)
    for seed in range(draws_for_power(exact, slipped_pair(exact.view(6, 6)))):
        out = gen.generate(prompt, max_new_tokens=2, temperature=1.0, seed=seed)
        counts[out.token_ids[0] * 6 + out.token_ids[1]] += 1
    assert pooled_chisquare(counts, exact) > ALPHA


@pytest.mark.real
@needs_tree_option
def test_real_model_greedy_equals_generate(smol):  # smol: the shared model check_real_greedy uses
    from test_real_model import check_real_greedy

    assert check_real_greedy("prompt-lookup", tree_width=4) >= 1.0
