"""Lookahead decoding: the n-gram pool and the Jacobi window on plain token lists, the
window's auxiliary nodes against plain passes, greedy equality and sampling losslessness."""
from __future__ import annotations

import random

import pytest
import torch

from verispec import SamplingConfig, SpeculativeGenerator
from verispec.drafters.base import DraftContext
from verispec.drafters.lookahead import JacobiWindow, Lookahead, NGramPool, trie
from verispec.engine.sampling import probabilities
from verispec.engine.target import CachedLM
from conftest import hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

PROMPTS = [[5, 17, 33, 2, 8, 61, 5, 17], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [42], [9, 9, 9, 9, 10, 11, 9, 9]]


# --- the n-gram pool ---

def test_pool_keys_by_first_token_most_recent_first():
    pool = NGramPool(n=3, capacity=2)
    pool.add((1, 2, 3))
    pool.add((1, 4, 5))
    pool.add((7, 8, 9))
    assert pool.continuations(1) == [(4, 5), (2, 3)]
    assert pool.continuations(7) == [(8, 9)] and pool.continuations(2) == []
    pool.add((1, 2, 3))  # seen again: becomes the most recent, not a duplicate
    assert pool.continuations(1) == [(2, 3), (4, 5)]
    pool.add((1, 6, 6))  # over capacity: the least recent goes
    assert pool.continuations(1) == [(6, 6), (2, 3)]
    assert pool.continuations(1, limit=1) == [(6, 6)]
    assert len(pool) == 3


def test_pool_rejects_wrong_sizes():
    with pytest.raises(ValueError):
        NGramPool(n=1, capacity=3)
    with pytest.raises(ValueError, match="3-gram"):
        NGramPool(n=3, capacity=3).add((1, 2))


# --- the Jacobi window ---

def window_3x4() -> JacobiWindow:
    # W=3 columns, N=4: levels 0..2
    return JacobiWindow(3, 4, [[10, 11, 12], [20, 21, 22], [30, 31, 32]])


def test_window_aux_layout():
    w = window_3x4()
    n_tree = 2  # the root and one drafted node
    tokens, positions, visible = w.aux_nodes(n_tree)
    # level 0 column 0 is the root: only columns 1, 2 of level 0 are auxiliary nodes
    assert tokens == (11, 12, 20, 21, 22, 30, 31, 32)
    assert positions == (1, 2, 1, 2, 3, 2, 3, 4)  # level j, column i sits at i + j after the root
    assert visible.shape == (8, n_tree + 8)
    names = ["root", "draft", "L0c1", "L0c2", "L1c0", "L1c1", "L1c2", "L2c0", "L2c1", "L2c2"]

    def sees(a):
        return {names[j] for j in range(len(names)) if visible[a, j]}

    assert sees(0) == {"root", "L0c1"}
    assert sees(1) == {"root", "L0c1", "L0c2"}
    assert sees(2) == {"root", "L1c0"}
    assert sees(4) == {"root", "L0c1", "L0c2", "L1c2"}
    assert sees(7) == {"root", "L0c1", "L0c2", "L1c2", "L2c2"}
    # never a drafted tree node
    assert not visible[:, 1].any()
    # new guesses come from the last level
    assert w.output_rows(n_tree) == [n_tree + 5, n_tree + 6, n_tree + 7]


def test_window_ngrams_and_advance():
    w = window_3x4()
    grams = w.ngrams(root=99, new_row=[40, 41, 42])
    assert grams == [(99, 20, 30, 40), (11, 21, 31, 41), (12, 22, 32, 42)]  # along each column's diagonal
    w.advance([40, 41, 42])
    assert w.levels == [[20, 21, 22], [30, 31, 32], [40, 41, 42]]


def test_window_with_two_gram_uses_the_root_row():
    w = JacobiWindow(3, 2, [[1, 2, 3]])
    tokens, positions, _ = w.aux_nodes(1)
    assert tokens == (2, 3) and positions == (1, 2)
    assert w.output_rows(1) == [0, 1, 2]  # column 0's new guess is the root's own prediction
    assert w.ngrams(7, [4, 5, 6]) == [(7, 4), (2, 5), (3, 6)]


def test_random_window_draws_from_the_context():
    w = JacobiWindow.random(4, 3, [5, 6, 7], random.Random(0))
    assert len(w.levels) == 2 and all(len(r) == 4 and set(r) <= {5, 6, 7} for r in w.levels)
    with pytest.raises(ValueError):
        JacobiWindow(3, 3, [[1, 2, 3]])


def test_trie_shares_prefixes_and_respects_depth():
    t = trie(7, [(1, 2, 3), (1, 2, 4), (5, 6, 7)], max_depth=3)
    assert t.tokens == (7, 1, 2, 3, 4, 5, 6, 7) and t.parents == (-1, 0, 1, 2, 2, 0, 5, 6)
    t = trie(7, [(1, 2, 3), (1, 2, 4)], max_depth=2)
    assert t.tokens == (7, 1, 2) and max(t.depths) == 2
    assert trie(7, [], 5).tokens == (7,)


def test_drafter_on_plain_lists():
    """propose -> the pool's n-grams for the root + the window; observe -> one Jacobi step."""
    d = Lookahead(None, W=3, N=3, G=2)
    d.begin([1, 2, 3])
    d.window = JacobiWindow(3, 3, [[0, 11, 12], [20, 21, 22]])
    d.pool.add((5, 6, 7))
    ctx = DraftContext([1, 2, 5], max_depth=4, sampling=SamplingConfig(), rng=None)
    tree = d.propose(ctx)
    assert tree.tokens == (5, 6, 7) and tree.parents == (-1, 0, 1)
    assert tree.aux_tokens == (11, 12, 20, 21, 22) and tree.aux_positions == (1, 2, 1, 2, 3)
    logits = torch.zeros(len(tree) + 5, 50)
    for row, token in zip(d.window.output_rows(len(tree)), [30, 31, 32]):
        logits[row, token] = 1.0
    d.observe(tree, logits, None, [6, 7, 8])
    assert d.window.levels == [[20, 21, 22], [30, 31, 32]]
    assert d.pool.continuations(5) == [(20, 30), (6, 7)]
    assert d.pool.continuations(11) == [(21, 31)] and d.pool.continuations(12) == [(22, 32)]
    # the last step of a generation carries no window (nothing left to guess for)
    last = d.propose(DraftContext([1, 2, 5], max_depth=0, sampling=SamplingConfig(), rng=None))
    assert last.tokens == (5,) and not last.aux_tokens
    d.observe(last, torch.zeros(1, 50), None, [9])
    assert d.window.levels == [[20, 21, 22], [30, 31, 32]]


@pytest.mark.parametrize("bad", [dict(W=0), dict(N=1), dict(G=0), dict(W=2.5)])
def test_bad_options(bad):
    with pytest.raises(ValueError, match="lookahead option"):
        Lookahead(None, **bad)


# --- with a model ---

def fresh_logits(model, tokens):
    with torch.inference_mode():
        return model(input_ids=torch.tensor([tokens])).logits[0, -1]


def test_window_logits_are_each_columns_causal_sequence(tiny):
    """Every auxiliary node predicts what a plain pass over its column's sequence predicts."""
    context = [3, 14, 15, 92, 65, 35]
    w = JacobiWindow(3, 4, [[0, 11, 12], [20, 21, 22], [30, 31, 32]])
    d = Lookahead(tiny, W=3, N=4, G=3)
    d.begin(context)
    d.window = w
    d.pool.add((35, 50, 51, 52))
    tree = d.propose(DraftContext(context, 5, SamplingConfig(), None))
    lm = CachedLM(tiny.model)
    lm.extend(context[:-1])
    logits = lm.forward_tree(tree)
    n = len(tree)
    for a, (j, i) in enumerate(w.aux_cells()):
        sequence = context + w.levels[0][1:i + 1] + [w.levels[level][i] for level in range(1, j + 1)]
        torch.testing.assert_close(logits[n + a], fresh_logits(tiny.model, sequence), atol=1e-4, rtol=1e-4)
    for node in range(n):  # the verification branch is untouched by the window
        path = [tree.tokens[k] for k in tree.path_to(node)]
        torch.testing.assert_close(logits[node], fresh_logits(tiny.model, context + path[1:]), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("options", [{}, dict(W=3, N=2, G=2), dict(W=1, N=2, G=1), dict(W=7, N=5, G=7), dict(W=4, N=3, G=1)])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_equals_generate(tiny, prompt, options):
    ref = hf_greedy(tiny, prompt, 48)
    out = SpeculativeGenerator(tiny, method="lookahead", **options).generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref


def test_accepts_ngrams_on_a_repetitive_model(tiny):
    """The tiny random model falls into loops; Jacobi n-grams then get accepted."""
    out = SpeculativeGenerator(tiny, method="lookahead").generate(PROMPTS[3], max_new_tokens=48)
    assert out.stats.mean_accepted_tokens > 1.5 and out.stats.accepted_tokens > 0


def test_generator_is_reusable(tiny):
    gen = SpeculativeGenerator(tiny, method="lookahead", W=4, N=3, G=4)
    outs = [gen.generate(p, max_new_tokens=24).token_ids for p in PROMPTS + PROMPTS]
    assert outs[:4] == outs[4:] == [hf_greedy(tiny, p, 24) for p in PROMPTS]


def test_sampling_matches_target_distribution():
    """Tokens 2 and 3 of three (step 2 verifies n-grams drawn up in step 1) follow the target."""
    target = tiny_llama(vocab=6, seed=3)
    prompt = [0, 1, 2, 3, 4, 5, 1, 2]  # every token in the context: the window's first guesses cover the vocabulary
    sampling = SamplingConfig(temperature=1.0)
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)  # [6]
        seconds = torch.cat([torch.tensor([prompt]).expand(6, -1), torch.arange(6)[:, None]], 1)
        p2 = probabilities(target.model(seconds).logits[:, -1], sampling)  # [t1, t2]
        thirds = torch.cat([seconds.repeat_interleave(6, 0), torch.arange(6).repeat(6)[:, None]], 1)
        p3 = probabilities(target.model(thirds).logits[:, -1], sampling).view(6, 6, 6)  # [t1, t2, t3]
    exact = (p1[:, None, None] * p2[:, :, None] * p3).sum(0)  # marginal of (t2, t3)
    gen = SpeculativeGenerator(target, method="lookahead", W=8, N=3, G=4)
    counts, drafted = torch.zeros(6, 6), 0
    # enough draws to catch a second token verified against the wrong context (stat_power)
    draws = draws_for_power(exact, slipped_pair(exact))
    for seed in range(draws):
        out = gen.generate(prompt, max_new_tokens=3, temperature=1.0, seed=seed)
        counts[out.token_ids[1], out.token_ids[2]] += 1
        drafted += out.stats.drafted_tokens
    assert drafted > 0.45 * draws  # the rule really verified drafts
    assert pooled_chisquare(counts, exact) > ALPHA


def test_unsupported_architecture_is_refused():
    from transformers import GPT2Config, GPT2LMHeadModel

    class LM:
        model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50)).eval()
        tokenizer = None
        eos_token_ids: list[int] = []

    with pytest.raises(NotImplementedError, match="tree attention"):
        SpeculativeGenerator(LM(), method="lookahead").generate([1, 2, 3], max_new_tokens=4)


# --- the real model ---

@pytest.mark.real
def test_real_model_greedy_equals_generate(smol):  # smol: the shared model check_real_greedy uses
    from test_real_model import check_real_greedy

    # over one token per target pass: some drafts were accepted
    assert check_real_greedy("lookahead") > 1.0
