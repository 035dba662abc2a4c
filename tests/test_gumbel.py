"""The gumbel rule (coupled, seeded sampling): every token is the Gumbel-max draw whose noise is
keyed by (seed, sequence index), for the target and the drafts alike. Lossless (distribution
tests, and a deliberately wrong keying that fails them), and token for token `ar`'s output for a
seed whatever the method (tiny random models, float32)."""
from __future__ import annotations

import random

import pytest
import torch

from verispec import SamplingConfig, SpeculativeGenerator
from verispec.acceptance import GumbelRule, choose_rule
from verispec.draft_init import layer_subset
from verispec.engine import sampling as sampling_module
from verispec.engine.sampling import gumbel_noise, probabilities
from verispec.engine.tree import TokenTree
from conftest import tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair
from test_export import eagle3_dir, medusa_dir

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 96


# ------------------------------------------------------------------ the noise


def test_noise_is_a_function_of_seed_and_index_and_standard_gumbel():
    a = gumbel_noise(7, 40, 5000)
    assert torch.equal(a, gumbel_noise(7, 40, 5000))
    assert not torch.equal(a, gumbel_noise(7, 41, 5000)) and not torch.equal(a, gumbel_noise(8, 40, 5000))
    sample = torch.cat([gumbel_noise(1, i, 5000) for i in range(20)])
    assert abs(float(sample.mean()) - 0.5772) < 0.02  # Euler-Mascheroni: the standard Gumbel's mean
    assert abs(float(sample.var()) - torch.pi ** 2 / 6) < 0.05
    assert torch.isfinite(sample).all()


# ------------------------------------------------------------------ lossless: the distribution


def joint_of_first_two(target, prompt, sampling) -> torch.Tensor:
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)
        V = p1.shape[-1]
        batch = torch.cat([torch.tensor([prompt]).expand(V, -1), torch.arange(V)[:, None]], 1)
        p2 = probabilities(target.model(batch).logits[:, -1], sampling)
    return p1[:, None] * p2


def pair_counts(gen, prompt, sampling, draws: int) -> torch.Tensor:
    V = gen.lm.model.config.vocab_size
    counts = torch.zeros(V, V)
    for seed in range(draws):
        out = gen.generate(prompt, max_new_tokens=2, temperature=sampling.temperature, top_k=sampling.top_k,
                           top_p=sampling.top_p, seed=seed)
        counts[out.token_ids[0], out.token_ids[1]] += 1
    return counts


@pytest.mark.parametrize("method,options,temperature,top_k,top_p", [
    ("ar", {}, 1.0, 0, 1.0),
    ("ar", {}, 0.7, 4, 0.9),
    ("draft-model", {"k": 3}, 1.0, 0, 1.0),
    ("draft-model", {"tree": "dynamic", "depth": 2, "top_k": 2, "budget": 4}, 1.0, 0, 1.0),
])
def test_gumbel_sampling_matches_the_targets_joint_distribution(method, options, temperature, top_k, top_p):
    target, draft = tiny_llama(vocab=6, seed=3), tiny_llama(vocab=6, layers=1, seed=4)
    prompt = [1, 2, 3]
    sampling = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    exact = joint_of_first_two(target, prompt, sampling)
    if method == "draft-model":
        options = {**options, "draft": draft}
    gen = SpeculativeGenerator(target, method=method, rule="gumbel", **options)
    counts = pair_counts(gen, prompt, sampling, draws_for_power(exact, slipped_pair(exact)))
    assert counts.flatten()[exact.flatten() == 0].sum() == 0  # filtered-out pairs never appear
    assert pooled_chisquare(counts, exact) > ALPHA


def test_noise_not_keyed_by_position_fails_the_same_test(monkeypatch):
    """Deliberately wrong: one noise vector for every position couples a token to the previous one."""
    real = sampling_module.gumbel_noise
    monkeypatch.setattr(sampling_module, "gumbel_noise", lambda seed, index, vocab, device="cpu": real(seed, 0, vocab, device))
    target = tiny_llama(vocab=6, seed=3)
    prompt, sampling = [1, 2, 3], SamplingConfig(temperature=1.0)
    exact = joint_of_first_two(target, prompt, sampling)
    gen = SpeculativeGenerator(target, method="ar", rule="gumbel")
    counts = pair_counts(gen, prompt, sampling, draws_for_power(exact, slipped_pair(exact)))
    assert pooled_chisquare(counts, exact) < ALPHA


# ------------------------------------------------------------------ token-identical to ar for a seed


@pytest.fixture(scope="module")
def target():
    return tiny_llama(vocab=VOCAB, layers=3, seed=11)


@pytest.fixture(scope="module")
def heads(target, tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    return {"eagle": eagle3_dir(target, root / "eagle3"), "medusa": medusa_dir(target, root / "medusa")}


def prompt_of(seed: int) -> list[int]:
    rng = random.Random(seed)
    if seed % 2:  # repetitive: the copy drafters get accepted drafts too
        phrase = [rng.randrange(VOCAB) for _ in range(6)]
        return [t for _ in range(4) for t in phrase + [rng.randrange(VOCAB)]]
    return [rng.randrange(VOCAB) for _ in range(30)]


METHODS = [
    ("draft-model", {"k": 4}), ("draft-model", {"k": "auto"}),
    ("draft-model", {"tree": [[0], [1], [0, 0], [1, 0], [0, 0, 0]], "children": "sample-unique"}),
    ("draft-model", {"tree": "dynamic", "budget": 12}), ("layer-skip", {"skip": [1], "k": 3}),
    ("prompt-lookup", {}), ("prompt-lookup", {"tree_width": 3}), ("recycling", {}), ("lookahead", {}),
    ("eagle", {}), ("medusa", {}),
]


@pytest.mark.parametrize("method,options", METHODS, ids=[f"{m}-{i}" for i, (m, _) in enumerate(METHODS)])
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.6, 20, 0.9)])
def test_every_method_emits_ars_tokens_for_a_seed(target, heads, method, options, temperature, top_k, top_p):
    if method == "draft-model":
        options = {**options, "draft": layer_subset(target, [0, 1])}
    if method in heads:
        options = {**options, "drafter": str(heads[method])}
    ar = SpeculativeGenerator(target, method="ar", rule="gumbel")
    spec = SpeculativeGenerator(target, method=method, rule="gumbel", **options)
    settings = dict(max_new_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p)
    passes = tokens = 0
    for seed in range(6):
        want = ar.generate(prompt_of(seed), seed=seed, **settings).token_ids
        got = spec.generate(prompt_of(seed), seed=seed, **settings)
        assert got.token_ids == want, f"seed {seed}"
        passes, tokens = passes + got.stats.target_passes, tokens + len(got.token_ids)
    if method in ("draft-model", "layer-skip"):  # (the random model's samples rarely repeat a phrase to copy)
        assert passes < tokens  # drafts were accepted: the multi-token verification was exercised


def test_a_draft_equal_to_the_target_is_always_accepted(target):
    """The draft draws with the target's noise of the same index: with the target's own
    distribution it picks exactly what the target picks, so every draft is accepted (noise
    read one index off would accept about as often as two independent draws agree)."""
    gen = SpeculativeGenerator(target, method="draft-model", draft=target, k=4, rule="gumbel")
    out = gen.generate(prompt_of(0), max_new_tokens=40, temperature=1.0, seed=5)
    assert out.stats.accepted_tokens == out.stats.drafted_tokens > 0


def test_a_continuation_keeps_the_same_noise(target):
    """The noise is keyed by the absolute sequence index: decoding 10 tokens and then 10 more
    from there gives the 20 tokens of one generation."""
    gen = SpeculativeGenerator(target, method="prompt-lookup", rule="gumbel")
    prompt = prompt_of(1)
    whole = gen.generate(prompt, max_new_tokens=20, temperature=1.0, seed=9).token_ids
    first = gen.generate(prompt, max_new_tokens=10, temperature=1.0, seed=9).token_ids
    second = gen.generate(prompt + first, max_new_tokens=10, temperature=1.0, seed=9).token_ids
    assert first + second == whole


def test_without_a_seed_one_is_drawn_and_reported(target):
    gen = SpeculativeGenerator(target, method="ar", rule="gumbel")
    out = gen.generate(prompt_of(2), max_new_tokens=12, temperature=1.0)
    assert isinstance(out.seed, int)
    assert gen.generate(prompt_of(2), max_new_tokens=12, temperature=1.0, seed=out.seed).token_ids == out.token_ids


def test_at_temperature_zero_gumbel_is_greedy(target):
    greedy = SpeculativeGenerator(target, method="ar").generate(prompt_of(4), max_new_tokens=16)
    gumbel = SpeculativeGenerator(target, method="prompt-lookup", rule="gumbel").generate(prompt_of(4), max_new_tokens=16)
    assert gumbel.token_ids == greedy.token_ids


# ------------------------------------------------------------------ the rule on its own, and bad input


def test_the_rule_accepts_the_child_that_drafted_the_targets_pick():
    sampling = SamplingConfig(temperature=1.0, seed=3, coupled=True)
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    pick0 = int((probabilities(logits[0], sampling).double().log() + gumbel_noise(3, 10, 50)).argmax())
    other = (pick0 + 1) % 50
    # root -> (other, pick0); pick0 -> one child that can only match by chance
    tree = TokenTree((0, other, pick0, 7), (-1, 0, 0, 2))
    verdict = GumbelRule().verify(tree, logits, sampling, None, position=10)
    pick1 = int((probabilities(logits[2], sampling).double().log() + gumbel_noise(3, 11, 50)).argmax())
    assert verdict.accepted[:1] == [2]
    assert verdict.accepted == ([2, 3] if pick1 == 7 else [2])
    if pick1 != 7:
        assert verdict.next_token == pick1 and verdict.next_kind == "recovered"


def test_bad_combinations_say_what_to_use():
    with pytest.raises(ValueError, match="needs a seed"):
        SamplingConfig(temperature=1.0, coupled=True)
    with pytest.raises(ValueError, match="gumbel rule"):
        choose_rule(SamplingConfig(temperature=1.0, seed=1, coupled=True), "speculative-sampling")
    with pytest.raises(ValueError, match="coupled=True"):
        choose_rule(SamplingConfig(temperature=1.0, seed=1), "gumbel")
    with pytest.raises(ValueError, match="takes no options"):
        choose_rule(SamplingConfig(temperature=1.0, seed=1, coupled=True), "gumbel", epsilon=0.1)
    assert type(choose_rule(SamplingConfig(temperature=1.0, seed=1, coupled=True))) is GumbelRule
    with pytest.raises(ValueError, match="step's position"):
        GumbelRule().verify(TokenTree.chain(0), torch.zeros(1, 8), SamplingConfig(temperature=1.0, seed=1, coupled=True),
                            None)

