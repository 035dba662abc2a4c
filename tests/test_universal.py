"""Cross-tokenizer drafting: text <-> tokens at the seam on plain strings with real tokenizers,
greedy equality on tiny models with different vocabularies, a draft that differs from the
target only by its token ids (accepts everything), sampling losslessness, clear errors."""
from __future__ import annotations

import copy
import random
import string

import pytest
import torch

from verispec import LoadedModel, SamplingConfig, SpeculativeGenerator
from verispec.drafters.draft_model import _common_prefix
from verispec.drafters.universal import (
    IncrementalText, Retokenizer, Universal, continuation_ids, decode_raw, encode_raw, special_prefix, text_delta,
)
from verispec.engine.sampling import probabilities
from conftest import TinyLM, fetched, hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

CPU = torch.device("cpu")
CHARS = sorted(set(string.printable) - set("\x0b\x0c\r"))


# --- tokenizers ---

def char_tokenizer(order_seed: int | None = None, merges=(), normalizer=None):
    """A character-level tokenizer (optionally with a few BPE merges), ids shuffled by order_seed."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    symbols = list(CHARS)
    if order_seed is not None:
        random.Random(order_seed).shuffle(symbols)
    symbols += [a + b for a, b in merges]
    tok = Tokenizer(models.BPE(vocab={s: i for i, s in enumerate(symbols)}, merges=list(merges)))
    tok.decoder = decoders.Fuse()
    if normalizer is not None:
        tok.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def real_tokenizer(name: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(fetched(name))  # fetched now if need be; fails loudly if it cannot be


@pytest.fixture(scope="module", params=[pytest.param(n, marks=pytest.mark.real) for n in ["smollm2-135m-instruct", "gemma3-270m"]])
def tok(request):
    return real_tokenizer(request.param)


def loaded(model, tokenizer, name: str) -> LoadedModel:
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, dtype=torch.float32, device=CPU)


# --- the seam, on plain strings with the real tokenizers ---

def test_a_committed_token_the_text_would_merge_with_is_not_recut(tok):
    committed = encode_raw(tok, "The weather was nice, so we went to th")
    cand = continuation_ids(tok, committed, "e park and played.")
    assert decode_raw(tok, committed + cand) == "The weather was nice, so we went to the park and played."
    assert tok.convert_ids_to_tokens(cand[0]) == "e"  # " th" stays; the draft continues it with "e"


@pytest.mark.parametrize("text", [" 12345 + 678 = 13023", "\n    return x  # done", " 🙂 café 日本語", "  two  spaces",
                                  ""])
def test_continuation_spells_exactly_the_committed_text_plus_the_draft(tok, text):
    committed = encode_raw(tok, "def f(x):\n    y = x * 2")
    cand = continuation_ids(tok, committed, text)
    assert decode_raw(tok, committed + cand) == decode_raw(tok, committed) + text


def test_continuation_uses_the_canonical_cut_where_the_seam_allows(tok):
    committed = encode_raw(tok, "Hello world.")
    cand = continuation_ids(tok, committed, " How are you?")
    assert cand == encode_raw(tok, "Hello world. How are you?")[len(committed):]


@pytest.mark.real  # the real tokenizers, fetched by conftest.fetched
def test_continuation_after_special_tokens():
    smol = real_tokenizer("smollm2-135m-instruct")
    committed = list(smol.apply_chat_template([{"role": "user", "content": "Hi!"}], add_generation_prompt=True,
                                              tokenize=True, return_dict=True)["input_ids"])
    cand = continuation_ids(smol, committed, "Hello! How can I help?")
    assert decode_raw(smol, committed + cand) == decode_raw(smol, committed) + "Hello! How can I help?"
    assert not set(cand) & set(smol.all_special_ids)


@pytest.mark.real  # the real tokenizers, fetched by conftest.fetched
def test_continuation_keeps_only_a_consistent_prefix():
    smol = real_tokenizer("smollm2-135m-instruct")
    committed = encode_raw(smol, "A smile: ")
    smile = encode_raw(smol, "🙂")
    assert len(smile) > 1  # bytes of one character in several tokens
    # a committed text ending inside a character: the draft's text cannot continue it
    assert continuation_ids(smol, committed + smile[:1], " ok") == []
    # a character completed by its last byte token is fine
    cand = continuation_ids(smol, committed + smile, " ok")
    assert decode_raw(smol, committed + smile + cand) == "A smile: 🙂 ok"
    # ids beyond the target's vocabulary are never proposed
    full = continuation_ids(smol, committed, "fine words, and more")
    limit = max(full)
    assert continuation_ids(smol, committed, "fine words, and more", vocab_size=limit) == full[: full.index(limit)]


def test_text_delta(tok):
    context = encode_raw(tok, "Once upon a")
    new = encode_raw(tok, "Once upon a time, there")[len(context):]
    assert text_delta(tok, context, new) == " time, there"
    assert text_delta(tok, context, []) == ""
    smile = encode_raw(tok, " 🙂")
    if len(smile) > 1:  # a cut multi-byte character is left out
        assert "\ufffd" not in text_delta(tok, context, smile[:-1])


def test_retokenizer_reencodes_only_the_seam(tok):
    r = Retokenizer(tok)
    rng = random.Random(0)
    pieces = ["a", " b", "cd", "é", "🙂", "\n", "  ", "12", "3", ".", " the", "re", "日本", " wor", "ld"]
    text = ""
    for _ in range(300):
        before = list(r.body)
        if rng.random() < 0.1 and text:
            text = text[: -rng.randint(1, 3)]
        else:
            text += rng.choice(pieces)
        ids = r.update(text)
        assert ids[: len(r.prefix)] == r.prefix == special_prefix(tok)
        assert decode_raw(tok, r.body) == text
        if text.startswith(r.text) and before:
            assert _common_prefix(before, r.body) >= len(before) - 4  # the cache for the rest is kept


@pytest.mark.real  # the real tokenizers, fetched by conftest.fetched
def test_retokenizer_redoes_a_token_that_the_text_extends():
    smol = real_tokenizer("smollm2-135m-instruct")
    r = Retokenizer(smol)
    r.update("Hello wor")
    assert r.update("Hello world") == encode_raw(smol, "Hello world")


def test_incremental_text_equals_a_full_decode(tok):
    inc = IncrementalText(tok, skip_special=True)
    rng = random.Random(1)
    ids: list[int] = []
    for _ in range(300):
        if rng.random() < 0.1 and ids:
            ids = ids[: -rng.randint(1, 2)]
        else:
            ids = ids + [rng.randrange(0, 3000) for _ in range(rng.randint(1, 3))]
        assert inc.update(ids) == decode_raw(tok, ids, skip_special=True)


# --- errors ---

def test_errors_name_the_fix():
    tiny = tiny_llama(vocab=len(CHARS))
    target = loaded(tiny.model, char_tokenizer(), "chars")
    with pytest.raises(ValueError, match="needs a draft model"):
        Universal(target)
    with pytest.raises(ValueError, match="draft model 'tiny' has no tokenizer"):
        Universal(target, draft=TinyLM(tiny.model))
    with pytest.raises(ValueError, match="target model 'tiny' has no tokenizer"):
        Universal(TinyLM(tiny.model), draft=target)
    from tokenizers import normalizers

    lowercase = loaded(tiny.model, char_tokenizer(normalizer=normalizers.Lowercase()), "lower")
    with pytest.raises(ValueError, match=r"decode\(encode\(text\)\) == text.*'lower'"):
        Universal(target, draft=lowercase)
    too_many = loaded(tiny_llama(vocab=50).model, char_tokenizer(), "small")
    with pytest.raises(ValueError, match="only 50 embeddings"):
        Universal(target, draft=too_many)
    with pytest.raises(ValueError, match="k >= 1"):
        Universal(target, draft=target, k=0)


# --- tiny models with different vocabularies ---

MERGES = [("t", "h"), ("th", "e"), (" ", "the"), ("i", "n"), ("e", " ")]
TEXTS = ["the cat", "Hello, world!", "def f(x):\n  return", "1 2 3"]


@pytest.fixture(scope="module")
def char_pair():
    a_tok, b_tok = char_tokenizer(), char_tokenizer(order_seed=1, merges=MERGES)
    a = loaded(tiny_llama(vocab=len(a_tok), seed=5).model, a_tok, "chars-a")
    b = loaded(tiny_llama(vocab=len(b_tok), layers=1, seed=6).model, b_tok, "chars-b")
    return a, b


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("direction", ["a<-b", "b<-a"])
def test_greedy_equals_generate_across_vocabularies(char_pair, direction, text):
    target, draft = char_pair if direction == "a<-b" else char_pair[::-1]
    prompt = target.encode(text)
    ref = hf_greedy(target, prompt, 40)
    out = SpeculativeGenerator(target, method="universal", draft=draft, k=4).generate(prompt, max_new_tokens=40,
                                                                                      stop_token_ids=[])
    assert out.token_ids == ref


def permuted_copy(lm: LoadedModel, order_seed: int) -> LoadedModel:
    """The same model and characters with other token ids: a draft that agrees with the target everywhere."""
    tokenizer = char_tokenizer(order_seed=order_seed)
    old_ids = [lm.tokenizer.convert_tokens_to_ids(c) for c in CHARS]
    new_ids = [tokenizer.convert_tokens_to_ids(c) for c in CHARS]
    model = copy.deepcopy(lm.model)
    with torch.no_grad():
        model.model.embed_tokens.weight[new_ids] = lm.model.model.embed_tokens.weight[old_ids]
        model.lm_head.weight[new_ids] = lm.model.lm_head.weight[old_ids]
    return loaded(model, tokenizer, "chars-permuted")


@pytest.mark.parametrize("text", TEXTS)
def test_a_draft_that_differs_only_in_token_ids_accepts_everything(char_pair, text):
    target = char_pair[0]
    draft = permuted_copy(target, order_seed=7)
    assert draft.tokenizer.get_vocab() != target.tokenizer.get_vocab()
    prompt = target.encode(text)
    out = SpeculativeGenerator(target, method="universal", draft=draft, k=4).generate(prompt, max_new_tokens=30,
                                                                                      stop_token_ids=[])
    assert out.token_ids == hf_greedy(target, prompt, 30)
    assert out.stats.accept_lengths == [5] * 6


@pytest.mark.real  # the real tokenizers, fetched by conftest.fetched
def test_real_tokenizers_on_tiny_random_models():
    """Random models emit arbitrary byte pieces: the seams get every odd case."""
    smol_tok, gemma_tok = real_tokenizer("smollm2-135m-instruct"), real_tokenizer("gemma3-270m")
    smol = loaded(tiny_llama(vocab=len(smol_tok), hidden=32, seed=0).model, smol_tok, "tiny-smol")
    gemma = loaded(tiny_llama(vocab=len(gemma_tok), hidden=32, seed=1).model, gemma_tok, "tiny-gemma")
    for target, draft in [(smol, gemma), (gemma, smol), (smol, smol)]:
        for text in ["The quick brown fox", "def f(x):\n    return", "Once upon a time"]:
            prompt = target.encode(text)
            ref = hf_greedy(target, prompt, 20)
            out = SpeculativeGenerator(target, method="universal", draft=draft, k=4).generate(
                prompt, max_new_tokens=20, stop_token_ids=[])
            assert out.token_ids == ref, (target.name, draft.name, text)


def test_sampling_matches_target_joint_distribution(char_pair):
    target, draft = char_pair
    prompt = target.encode("the ")
    sampling = SamplingConfig(temperature=1.0, top_k=3)
    vocab = len(target.tokenizer)
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)
        batch = torch.cat([torch.tensor([prompt]).expand(vocab, -1), torch.arange(vocab)[:, None]], 1)
        p2 = probabilities(target.model(batch).logits[:, -1], sampling)
    exact = (p1[:, None] * p2).flatten()
    gen = SpeculativeGenerator(target, method="universal", draft=draft, k=3)
    counts, drafted = torch.zeros(vocab * vocab), 0
    # enough draws to catch a second token verified against the wrong context (stat_power)
    draws = draws_for_power(exact, slipped_pair(exact.view(vocab, vocab)))
    for seed in range(draws):
        out = gen.generate(prompt, max_new_tokens=2, temperature=1.0, top_k=3, seed=seed, stop_token_ids=[])
        counts[out.token_ids[0] * vocab + out.token_ids[1]] += 1
        drafted += out.stats.drafted_tokens
    assert drafted > 2 / 3 * draws
    keep = exact > 0
    assert keep.sum() == 9 and counts[~keep].sum() == 0
    assert pooled_chisquare(counts, exact) > ALPHA


# --- the real models ---

def _check_greedy(target, draft, prompts, k=4, max_new=32):
    gen = SpeculativeGenerator(target, method="universal", draft=draft, k=k)
    accepted = 0
    for ids in prompts:
        with torch.inference_mode():
            ref = target.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)[0, len(ids):]
        out = gen.generate(ids, max_new_tokens=max_new)
        assert out.token_ids == ref.tolist(), (target.name, draft.name, target.decode(ids)[:60])
        accepted += out.stats.accepted_tokens
    return accepted


@pytest.fixture(scope="module")
def real_pair(smol):
    import verispec

    fetched("gemma3-270m")
    return verispec.load_model("gemma3-270m", dtype="float32"), smol


PLAIN = ["The capital of France is Paris. The capital of Germany is", "def fibonacci(n):\n",
         "Once upon a time, in a small village by the sea,"]


@pytest.mark.real
def test_real_pair_both_ways(real_pair):
    gemma, smol = real_pair
    assert _check_greedy(gemma, smol, [gemma.encode(t) for t in PLAIN]) > 0
    assert _check_greedy(smol, gemma, [smol.encode(t) for t in PLAIN]) > 0


@pytest.mark.real
def test_real_model_greedy_equals_generate(real_pair):
    from test_real_model import check_real_greedy

    gemma, _ = real_pair
    # over one token per target pass: some of gemma's re-tokenized drafts were accepted
    assert check_real_greedy("universal", draft=gemma, k=4) > 1.0
