"""The hybrid drafter: one tree from an inner drafter's tree and prompt-lookup continuations.
The merge on plain token lists; greedy identity to generate(); the sampling distribution."""
from __future__ import annotations

import pytest
import torch

from verispec import SamplingConfig, SpeculativeGenerator
from verispec.datastore import tokenizer_identity
from verispec.drafters.base import DraftContext
from verispec.drafters.hybrid import INNER, LOOKUP_FIRST, LOOKUP_OTHER, PassCost, Source, merge_sources
from verispec.heads.eagle import EagleHead, head_config, save_eagle
from conftest import exact_next_two, hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair  # the suite's statistical test

FLAT = PassCost({1: 1.0, 64: 1.0})  # verifying is free: keep every node up to the budget


def chain(tokens, accept, kind=LOOKUP_FIRST):
    return Source([-1, *tokens], list(range(-1, len(tokens))), [1.0, *accept], kind)


# --- the merge, on plain token lists ---

def test_trie_union_dedupes_shared_prefixes_and_keeps_the_larger_estimate():
    #   inner tree: root -> 5 -> 6, root -> 7 ; lookup: 5 6 8 and 7 9
    inner = Source([0, 5, 7, 6], [-1, 0, 0, 1], [1.0, 0.5, 0.3, 0.4], INNER)
    merged = merge_sources(1, [inner, chain([5, 6, 8], [0.9, 0.8, 0.7]), chain([7, 9], [0.2, 0.2], LOOKUP_OTHER)],
                           max_nodes=32, cost=FLAT)
    t = merged.tree
    assert t.tokens == (1, 5, 7, 6, 8, 9) and t.parents == (-1, 0, 0, 1, 3, 2)
    assert merged.kinds == [0, INNER | LOOKUP_FIRST, INNER | LOOKUP_OTHER, INNER | LOOKUP_FIRST, LOOKUP_FIRST, LOOKUP_OTHER]
    expected = [1.0, 0.9, 0.3, 0.9 * 0.8, 0.9 * 0.8 * 0.7, 0.3 * 0.2]  # max per node, product along the path
    assert merged.scores == pytest.approx(expected)
    assert merged.expected == pytest.approx(sum(expected))
    assert [torch.tensor(s).exp().item() for s in t.scores] == pytest.approx(expected)
    assert merged.kept_of[1] == [0, 1, 3, 4]  # the lookup chain's nodes, in the merged tree


def test_siblings_are_distinct_tokens():
    merged = merge_sources(0, [chain([3, 4], [0.5, 0.5]), chain([3, 5], [0.5, 0.5]), chain([3, 4, 6], [0.5] * 3)],
                           max_nodes=32, cost=FLAT)
    t = merged.tree
    for kids in t.children:
        toks = [t.tokens[c] for c in kids]
        assert len(toks) == len(set(toks))
    assert len(t) == 1 + 4  # 3, 4, 5, 6


def test_budget_keeps_the_best_nodes_and_stays_a_tree():
    inner = Source([0, 5, 7, 6, 2], [-1, 0, 0, 1, 2], [1.0, 0.6, 0.5, 0.9, 0.1], INNER)
    merged = merge_sources(1, [inner, chain([9, 9, 9], [0.55, 0.99, 0.99])], max_nodes=3, cost=FLAT)
    # scores: 5: .6, 7: .5, 6: .54, 2: .05, 9: .55, 9/9: .5445, 9/9/9: .539
    assert sorted(merged.scores[1:], reverse=True) == pytest.approx([0.6, 0.55, 0.5445])
    t = merged.tree
    assert len(t) == 4 and all(p < i for i, p in enumerate(t.parents) if i)


def test_cost_curve_decides_how_many_nodes():
    sources = [chain([1, 2, 3, 4], [0.9, 0.5, 0.2, 0.1])]
    # a pass over m nodes costs m one-node passes: only nodes scoring above the current rate pay
    linear = PassCost({1: 1.0, 2: 2.0})
    assert len(merge_sources(0, sources, 32, linear).tree) == 1  # nothing beats decoding alone
    # cost flat up to 3 nodes, then steep: 2 drafts
    kink = PassCost({1: 1.0, 3: 1.0, 4: 5.0})
    assert len(merge_sources(0, sources, 32, kink).tree) == 3
    # a fixed drafting cost makes more nodes worth their pass
    mild = PassCost({1: 1.0, 2: 1.3})
    assert len(merge_sources(0, sources, 32, mild).tree) < len(merge_sources(0, sources, 32, mild, draft_cost=10.0).tree)
    assert PassCost({1: 1.0, 4: 2.0})(3) == pytest.approx(5 / 3) and PassCost({1: 1.0, 4: 2.0})(7) == pytest.approx(3.0)


def test_sampled_nodes_are_kept_as_drawn_and_never_merged():
    sampled = Source([0, 5, 5], [-1, 0, 0], [1.0, 0.01, 0.01], INNER, mergeable=False)
    merged = merge_sources(1, [sampled, chain([5, 6], [0.9, 0.9])], max_nodes=4, cost=FLAT)
    t = merged.tree
    assert t.tokens == (1, 5, 5, 5, 6) and t.parents == (-1, 0, 0, 0, 3)  # lookup 5 is its own sibling, after them


def test_bad_cost_curve():
    with pytest.raises(ValueError, match="pass-cost curve"):
        PassCost({1: 1.0})


# --- end to end on a tiny model, with a tiny EAGLE head as the inner drafter ---

def head_dir(lm, path, seed=0):
    torch.manual_seed(seed)
    return save_eagle(EagleHead(head_config(lm.model.config)), path, tokenizer_identity(lm))


REPEATS = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6]  # a prompt prompt-lookup finds matches in


@pytest.mark.parametrize("options", [dict(), dict(base_options=dict(tree="chain", k=3)), dict(max_nodes=4, matches=1),
                                     dict(cost={1: 1.0, 2: 1.0, 64: 1.0}, draft_cost=0.0)])
def test_greedy_identical_to_generate_with_eagle_inside(tiny, tmp_path, options):
    path = head_dir(tiny, tmp_path / "head")
    gen = SpeculativeGenerator(tiny, "hybrid", drafter=str(path), base_options={"draft_vocab": 0, **options.pop("base_options", {})},
                               **options)
    drafted = 0
    for prompt in (REPEATS, [1, 90, 33, 2, 2, 14, 60], [3]):
        out = gen.generate(prompt, max_new_tokens=40)
        assert out.token_ids == hf_greedy(tiny, prompt, 40)
        drafted += out.stats.drafted_tokens
    assert drafted > 0


def test_greedy_identical_with_a_draft_model_inside(tiny, tiny_draft):
    gen = SpeculativeGenerator(tiny, "hybrid", base="draft-model", draft=tiny_draft,
                               base_options=dict(tree="dynamic", depth=3, top_k=2))
    for prompt in (REPEATS, [1, 90, 33, 2, 2, 14, 60]):
        assert gen.generate(prompt, max_new_tokens=40).token_ids == hf_greedy(tiny, prompt, 40)


def test_lookup_nodes_join_the_tree_and_the_estimates_learn(tiny, tmp_path):
    path = head_dir(tiny, tmp_path / "head")
    gen = SpeculativeGenerator(tiny, "hybrid", drafter=str(path), base_options={"draft_vocab": 0},
                               cost={1: 1.0, 64: 1.0})
    drafter = gen.drafter
    seen = []
    original = drafter.propose
    drafter.propose = lambda ctx: seen.append(drafter._last if (t := original(ctx)) else None) or t
    out = gen.generate(REPEATS, max_new_tokens=30)
    assert out.token_ids == hf_greedy(tiny, REPEATS, 30)
    kinds = {kind for merged, *_ in seen for kind in merged.kinds}
    assert kinds & {LOOKUP_FIRST, LOOKUP_FIRST | INNER} and INNER in {k & INNER for k in kinds}
    assert sum(drafter.lookup_first.trials) > 0 and sum(drafter.inner_scored.trials) > 0


def test_forwards_the_protocol_to_the_inner_drafter(tiny, tmp_path):
    path = head_dir(tiny, tmp_path / "head")
    gen = SpeculativeGenerator(tiny, "hybrid", drafter=str(path), base_options={"draft_vocab": 0})
    assert gen.drafter.needs_features and type(gen.drafter.inner).__name__ == "EagleDrafter"
    calls = []
    inner = gen.drafter.inner
    for name in ("begin", "propose", "observe"):
        fn = getattr(inner, name)
        setattr(inner, name, lambda *a, _fn=fn, _name=name, **kw: calls.append(_name) or _fn(*a, **kw))
    out = gen.generate([5, 6, 7, 8], max_new_tokens=10)
    assert calls[0] == "begin" and calls.count("propose") == calls.count("observe") == out.stats.target_passes


def test_bad_options(tiny, tmp_path):
    path = head_dir(tiny, tmp_path / "head")
    with pytest.raises(ValueError, match="base"):
        SpeculativeGenerator(tiny, "hybrid", base="hybrid")
    with pytest.raises(ValueError, match="max_nodes"):
        SpeculativeGenerator(tiny, "hybrid", drafter=str(path), max_nodes=0)
    with pytest.raises(ValueError, match="unknown method"):
        SpeculativeGenerator(tiny, "hybrid", base="nope")


# --- sampling: the hybrid tree's emitted tokens follow the target's distribution ---

@pytest.mark.parametrize("options", [dict(base_options=dict(tree="dynamic", depth=2, top_k=2, draft_vocab=0)),
                                     dict(base_options=dict(tree=[[0], [1]], children="sample", draft_vocab=0))])
def test_sampling_matches_target_distribution(tmp_path, options):
    """Tokens 2 and 3 (token 2 is the first one EAGLE drafts: the prompt's pass gives the first
    features) follow the target's exact joint distribution, with lookup continuations in the tree."""
    target = tiny_llama(vocab=4, seed=5)
    path = head_dir(target, tmp_path / "head", seed=1)
    prompt = [1, 2, 3, 1, 2]
    sampling = SamplingConfig(temperature=1.0)
    exact = exact_next_two(target.model, prompt, sampling)
    gen = SpeculativeGenerator(target, "hybrid", drafter=str(path), cost={1: 1.0, 64: 1.0}, draft_cost=0.0, **options)
    counts = torch.zeros(4, 4)
    # enough draws to catch a second token verified against the wrong context (stat_power)
    draws = draws_for_power(exact, slipped_pair(exact))
    for seed in range(draws):
        out = gen.generate(prompt, max_new_tokens=3, temperature=1.0, seed=seed)
        counts[out.token_ids[1], out.token_ids[2]] += 1
    lookup = sum(gen.drafter.lookup_first.trials)
    assert lookup > 2 / 3 * draws  # lookup nodes were verified, not only the head's
    assert pooled_chisquare(counts, exact) > ALPHA
