"""Greedy output equals transformers' own greedy generate, whatever the drafter does."""
from __future__ import annotations

import pytest
import torch

import verispec
from verispec import SpeculativeGenerator
from conftest import ScriptedDrafter, hf_greedy, tiny_llama

PROMPTS = [[5, 17, 33, 2, 8, 61, 5, 17], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [42], [9, 9, 9, 9, 10, 11, 9, 9]]


@pytest.mark.parametrize("prompt", PROMPTS)
@pytest.mark.parametrize("correct", [0, 1, 3, 6])  # nothing, exactly j, everything accepted (k = 6)
def test_scripted_drafts_keep_greedy_output(tiny, prompt, correct):
    ref = hf_greedy(tiny, prompt, 40)
    drafter = ScriptedDrafter(ref, len(prompt), k=6, correct=correct, vocab=96)
    out = SpeculativeGenerator(tiny, method=drafter).generate(prompt, max_new_tokens=40)
    assert out.token_ids == ref
    steps = out.stats
    assert steps.new_tokens == 40 and sum(steps.accept_lengths) == 40
    # every step but the last one (cut by max_new_tokens) accepts exactly `correct` drafts
    assert set(steps.accept_lengths[:-1]) == {correct + 1}


@pytest.mark.parametrize("max_new", [1, 2, 7, 13])
def test_max_new_tokens_exact_when_drafts_run_past_it(tiny, max_new):
    prompt = PROMPTS[0]
    ref = hf_greedy(tiny, prompt, max_new)
    drafter = ScriptedDrafter(hf_greedy(tiny, prompt, 40), len(prompt), k=8, correct=8, vocab=96)
    out = SpeculativeGenerator(tiny, method=drafter).generate(prompt, max_new_tokens=max_new)
    assert out.token_ids == ref and len(out.token_ids) == max_new


def test_stops_at_eos_inside_an_accepted_draft(tiny):
    prompt = PROMPTS[1]
    full = hf_greedy(tiny, prompt, 40)
    eos = full[9]
    ref = hf_greedy(tiny, prompt, 40, eos=eos)
    assert ref[-1] == eos and len(ref) < 40
    drafter = ScriptedDrafter(full, len(prompt), k=8, correct=8, vocab=96)
    out = SpeculativeGenerator(tiny, method=drafter).generate(prompt, max_new_tokens=40, stop_token_ids=[eos])
    assert out.token_ids == ref


@pytest.mark.parametrize("method,options", [
    ("ar", {}),
    ("prompt-lookup", {"k": 4}),
    ("prompt-lookup", {"k": 10, "max_ngram": 1, "min_ngram": 1}),
])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_registered_methods_keep_greedy_output(tiny, method, options, prompt):
    ref = hf_greedy(tiny, prompt, 48)
    out = SpeculativeGenerator(tiny, method=method, **options).generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref


@pytest.mark.parametrize("prompt", PROMPTS)
def test_draft_model_keeps_greedy_output(tiny, tiny_draft, prompt):
    ref = hf_greedy(tiny, prompt, 48)
    out = SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, k=4).generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref


def test_draft_model_equal_to_target_accepts_everything(tiny):
    prompt = PROMPTS[0]
    # no confidence stop: every draft is the target's own pick
    gen = SpeculativeGenerator(tiny, method="draft-model", draft=tiny, k=5, min_confidence=0.0)
    out = gen.generate(prompt, max_new_tokens=36)
    assert out.token_ids == hf_greedy(tiny, prompt, 36)
    assert out.stats.accept_lengths == [6] * 6
    assert out.stats.acceptance_rate == 1.0
    assert out.kinds[:6] == ["accepted"] * 5 + ["bonus"]


def test_ar_is_one_token_per_pass(tiny):
    out = SpeculativeGenerator(tiny, method="ar").generate(PROMPTS[0], max_new_tokens=10)
    assert out.stats.target_passes == 10 and out.stats.mean_accepted_tokens == 1.0
    assert out.kinds == ["target"] * 10


def test_generator_is_reusable_across_prompts(tiny, tiny_draft):
    gen = SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, k=3)
    for prompt in PROMPTS:
        assert gen.generate(prompt, max_new_tokens=20).token_ids == hf_greedy(tiny, prompt, 20)


@pytest.mark.parametrize("tree", [
    [[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0], [0, 0, 0, 0]],
    [[0], [1], [2], [0, 0], [0, 0, 0]],
    "dynamic",
])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_draft_model_trees_keep_greedy_output(tiny, tiny_draft, tree, prompt):
    ref = hf_greedy(tiny, prompt, 40)
    gen = SpeculativeGenerator(tiny, method="draft-model", draft=tiny_draft, tree=tree, depth=4, top_k=3, budget=12)
    out = gen.generate(prompt, max_new_tokens=40)
    assert out.token_ids == ref


def test_tree_of_target_itself_accepts_full_depth(tiny):
    """With the target as its own draft the top-ranked branch is always right."""
    gen = SpeculativeGenerator(tiny, method="draft-model", draft=tiny, tree=[[0], [1], [0, 0], [0, 1], [0, 0, 0]])
    out = gen.generate(PROMPTS[0], max_new_tokens=20)
    assert out.token_ids == hf_greedy(tiny, PROMPTS[0], 20)
    assert out.stats.accept_lengths[:4] == [4, 4, 4, 4]


@pytest.fixture(scope="module")
def qwen_pair():
    from conftest import tiny_qwen2

    return tiny_qwen2(), tiny_qwen2(layers=1, seed=1)


@pytest.mark.parametrize("method,options", [
    ("prompt-lookup", {"k": 6}),
    ("prompt-lookup", {"k": 6, "tree_width": 3}),
    ("draft-model", {"k": 4}),
    ("draft-model", {"k": "auto"}),
    ("draft-model", {"tree": [[0], [1], [0, 0], [0, 1], [1, 0]]}),
    ("draft-model", {"tree": "dynamic", "depth": 4, "top_k": 3, "budget": 12}),
    ("recycling", {}),
    ("lookahead", {}),
])
@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_methods_keep_greedy_output_on_qwen2(qwen_pair, method, options, prompt):
    """The realistic target's architecture (Qwen2) through chains, static and dynamic trees."""
    target, draft = qwen_pair
    if method == "draft-model":
        options = {**options, "draft": draft}
    out = SpeculativeGenerator(target, method=method, **options).generate(prompt, max_new_tokens=40)
    assert out.token_ids == hf_greedy(target, prompt, 40)


def test_on_step_streams_every_committed_token_and_can_stop(tiny):
    prompt = PROMPTS[1]
    gen = SpeculativeGenerator(tiny, method="prompt-lookup", k=4)
    steps: list[list[int]] = []
    out = gen.generate(prompt, max_new_tokens=30, on_step=steps.append)
    assert [t for s in steps for t in s] == out.token_ids == hf_greedy(tiny, prompt, 30)
    assert len(steps) == out.stats.target_passes
    seen: list[int] = []
    stopped = gen.generate(prompt, max_new_tokens=30, on_step=lambda new: seen.extend(new) or len(seen) < 5)
    assert stopped.token_ids == seen == out.token_ids[:len(seen)] and 5 <= len(seen) < 30
