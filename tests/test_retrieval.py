"""`retrieval` (REST): datastore build/load/lookup on plain token lists, the tokenizer check,
greedy equality with transformers' generate, the sampled distribution, the CLI hook."""
from __future__ import annotations

import argparse
import json
import random

import numpy as np
import pytest
import torch

import verispec.drafters.retrieval  # noqa: F401  (registers the method)
from verispec import SpeculativeGenerator
from verispec.config import SamplingConfig
from verispec.datastore import (SEPARATOR, Datastore, add_parser, build_datastore, html_to_text, sort_suffixes,
                                tokenizer_identity)
from verispec.drafters.base import DraftContext, make_drafter
from verispec.engine.sampling import probabilities
from conftest import hf_greedy, tiny_llama
from stat_power import ALPHA, draws_for_power, pooled_chisquare, slipped_pair

PROMPTS = [[5, 17, 33, 2, 8, 61, 5, 17], [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3], [42], [9, 9, 9, 9, 10, 11, 9, 9]]
IDS_96 = {"name_or_path": None, "vocab_hash": "ids-only:96", "vocab_size": 96}


def brute_suffix_order(tokens: np.ndarray, depth: int) -> list[int]:
    """Positions of real tokens sorted by their next `depth` tokens (separator and end lowest), ties by position."""
    padded = list(tokens.tolist()) + [SEPARATOR] * depth
    real = [p for p in range(len(tokens)) if tokens[p] != SEPARATOR]
    return sorted(real, key=lambda p: (padded[p:p + depth], p))


@pytest.mark.parametrize("seed,depth", [(0, 16), (1, 4), (2, 1), (3, 5)])
def test_suffix_sort_matches_brute_force(seed, depth):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, 4, size=400).astype(np.int32)  # a tiny alphabet: long shared prefixes
    tokens[rng.choice(400, 12, replace=False)] = SEPARATOR
    tokens[-1] = SEPARATOR
    doubled = 1 << (depth - 1).bit_length()  # prefix doubling sorts by a power of two of tokens
    assert sort_suffixes(tokens, depth).tolist() == brute_suffix_order(tokens, doubled)


def store_of(docs, tmp_path, **kw) -> Datastore:
    return build_datastore(docs, tmp_path / "ds", kw.pop("identity", IDS_96), **kw)


def test_longest_suffix_match_and_continuations(tmp_path):
    docs = [[1, 2, 3, 4, 5], [9, 2, 3, 7, 8], [2, 3, 4, 6], [7, 7, 3, 4, 5, 1]]
    store = store_of(docs, tmp_path)
    # "2 3" occurs three times, "1 2 3" once: the longest suffix that occurs wins
    assert store.match([8, 1, 2, 3]) == (3, *store.match([8, 1, 2, 3])[1:])
    m, lo, hi = store.match([8, 1, 2, 3])
    assert (m, hi - lo) == (3, 1)
    assert store.continuations([8, 1, 2, 3], depth=3).tolist() == [[4, 5, SEPARATOR]]  # stops at the document's end
    m, lo, hi = store.match([5, 5, 2, 3])
    assert (m, hi - lo) == (2, 3)
    conts = sorted(store.continuations([5, 5, 2, 3], depth=2).tolist())
    assert conts == [[4, 5], [4, 6], [7, 8]]
    assert store.match([3, 4]) == (2, *store.match([3, 4])[1:]) and np.ptp(store.match([3, 4])[1:]) == 3
    assert store.match([11, 12]) == (0, 0, 0) and store.continuations([11, 12], 4).shape == (0, 4)
    assert store.match([7, 3, 4], min_suffix=3)[0] == 3
    assert store.match([4], min_suffix=2) == (0, 0, 0)  # shorter than min_suffix: no lookup
    assert store.match([1, 7, 7, 3, 4, 5], max_suffix=4)[0] == 4


@pytest.mark.parametrize("seed", range(5))
def test_lookup_agrees_with_a_scan(seed, tmp_path):
    rng = random.Random(seed)
    docs = [[rng.randrange(5) for _ in range(rng.randrange(1, 60))] for _ in range(30)]
    store = store_of(docs, tmp_path)
    for _ in range(30):
        context = [rng.randrange(5) for _ in range(rng.randrange(1, 12))]
        best = (0, [])
        for m in range(2, min(16, len(context)) + 1):
            q = context[-m:]
            conts = [doc[i + m:i + m + 3] for doc in docs for i in range(len(doc) - m + 1) if doc[i:i + m] == q]
            if not conts:
                break
            best = (m, conts)
        m, lo, hi = store.match(context)
        assert (m, hi - lo) == (best[0], len(best[1]))
        got = sorted(tuple(t for t in row if t != SEPARATOR) for row in store.continuations(context, 3).tolist())
        assert got == sorted(tuple(c) for c in best[1])


def test_many_matches_are_sampled_evenly_through_the_sorted_range(tmp_path):
    # 900 occurrences of "1 2": 600 followed by 3, 300 by 4; a sample of 90 keeps the 2:1 ratio
    docs = [[1, 2, 3]] * 600 + [[1, 2, 4]] * 300
    store = store_of(docs, tmp_path)
    conts = store.continuations([0, 1, 2], depth=1, max_matches=90)
    assert len(conts) == 90 and (conts[:, 0] == 3).sum() == 60 and (conts[:, 0] == 4).sum() == 30


def test_drafted_tree_is_the_most_frequent_prefix_trie(tmp_path):
    docs = [[1, 2, 3, 4]] * 5 + [[1, 2, 3, 5]] * 3 + [[1, 2, 6]] * 2 + [[1, 2, 7, 8]]
    store = store_of(docs, tmp_path)
    drafter = make_drafter("retrieval", tiny_llama(), datastore=store, budget=4, depth=3)
    tree = drafter.propose(DraftContext([0, 1, 2], 10, SamplingConfig(), None))
    # weights: 3 (x8), 3-4 (x5), 3-5 (x3), 6 (x2), 7 (x1), 7-8 (x1): the top 4 are kept
    paths = {tuple(tree.tokens[i] for i in tree.path_to(n)[1:]) for n in range(1, len(tree))}
    assert tree.tokens[0] == 2 and paths == {(3,), (3, 4), (3, 5), (6,)}
    assert tree.tokens[1] == 3  # most shared sibling first
    shallow = drafter.propose(DraftContext([0, 1, 2], 1, SamplingConfig(), None))  # max_depth respected
    assert max(shallow.depths) == 1 and sorted(shallow.tokens[1:]) == [3, 6, 7]


def test_saved_datastore_reloads_identically_and_memory_mapped(tmp_path):
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 96, size=int(n)).tolist() for n in rng.integers(1, 300, size=40)]
    built = store_of(docs, tmp_path, sort_depth=8, note="unit test")
    loaded = Datastore.load(tmp_path / "ds")
    assert isinstance(loaded.tokens, np.memmap) and isinstance(loaded.suffix_array, np.memmap)
    assert loaded.tokens.dtype == np.int32 and loaded.suffix_array.dtype == np.int32
    assert np.array_equal(loaded.tokens, built.tokens) and np.array_equal(loaded.suffix_array, built.suffix_array)
    header = json.loads((tmp_path / "ds" / "datastore.json").read_text())
    assert header["n_tokens"] == sum(map(len, docs)) and header["n_documents"] == 40
    assert header["sort_depth"] == 8 and header["note"] == "unit test" and header["tokenizer"] == IDS_96
    assert len(loaded.suffix_array) == header["n_tokens"]
    rebuilt = build_datastore(docs, tmp_path / "again", IDS_96, sort_depth=8)
    assert np.array_equal(rebuilt.suffix_array, loaded.suffix_array)
    context = docs[3][:5]
    assert np.array_equal(loaded.continuations(context, 4), built.continuations(context, 4))
    with pytest.raises(ValueError, match="sort depth"):
        make_drafter("retrieval", tiny_llama(), datastore=tmp_path / "ds", max_suffix=12)


def test_datastore_of_another_tokenizer_is_refused(tmp_path):
    store_of([[1, 2, 3]], tmp_path)  # built for a 96-token vocabulary
    other = tiny_llama(vocab=64)
    assert tokenizer_identity(other)["vocab_hash"] != IDS_96["vocab_hash"]
    with pytest.raises(ValueError, match="Rebuild it for this model") as err:
        SpeculativeGenerator(other, method="retrieval", datastore=str(tmp_path / "ds"))
    assert "vocabulary" in str(err.value) and str(tmp_path / "ds") in str(err.value)


def test_tokenizer_identity_hashes_the_vocabulary():
    class Tok:
        def __init__(self, vocab, name="t"):
            self.vocab, self.name_or_path = vocab, name

        def get_vocab(self):
            return dict(self.vocab)

    a = tokenizer_identity(Tok({"a": 0, "b": 1}))
    assert a == tokenizer_identity(Tok({"b": 1, "a": 0}, name="elsewhere")) | {"name_or_path": "t"}
    assert a["vocab_hash"] != tokenizer_identity(Tok({"a": 1, "b": 0}))["vocab_hash"]
    assert a["vocab_size"] == 2 and a["vocab_hash"].startswith("sha256:")


def test_user_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="needs a datastore"):
        make_drafter("retrieval", tiny_llama())
    with pytest.raises(ValueError, match="verispec datastore build"):
        make_drafter("retrieval", tiny_llama(), datastore=tmp_path / "nowhere")
    with pytest.raises(ValueError, match="outside"):
        build_datastore([[1, 2, 500]], tmp_path / "bad", IDS_96)
    with pytest.raises(ValueError, match="empty"):
        build_datastore([[], []], tmp_path / "bad", IDS_96)


@pytest.fixture(scope="module")
def tiny_store(tmp_path_factory, tiny):
    """The tiny model's own greedy continuations of some prompts, plus random noise documents."""
    rng = np.random.default_rng(1)
    docs = [p + hf_greedy(tiny, p, 60) for p in ([5, 17, 33], [9, 9, 9, 9, 10], [7, 3, 1], [42])]
    docs += [rng.integers(0, 96, size=200).tolist() for _ in range(20)]
    return build_datastore(docs, tmp_path_factory.mktemp("tiny") / "ds", tokenizer_identity(tiny))


@pytest.mark.parametrize("options", [{}, {"budget": 4, "depth": 3}, {"budget": 64, "depth": 12, "max_matches": 8}])
@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_output_equals_hf_generate(tiny, tiny_store, prompt, options):
    ref = hf_greedy(tiny, prompt, 48)
    out = SpeculativeGenerator(tiny, method="retrieval", datastore=tiny_store, **options).generate(prompt, max_new_tokens=48)
    assert out.token_ids == ref


def test_datastore_of_own_generations_gets_drafts_accepted(tiny, tiny_store):
    gen = SpeculativeGenerator(tiny, method="retrieval", datastore=tiny_store)
    for prompt in ([5, 17, 33], [42]):
        out = gen.generate(prompt, max_new_tokens=40)
        assert out.token_ids == hf_greedy(tiny, prompt, 40)
        assert out.stats.mean_accepted_tokens > 3


def test_sampling_matches_target_joint_distribution(tmp_path):
    """Deterministic drafts with several siblings (one-hot q): output follows p exactly."""
    target = tiny_llama(vocab=6, seed=3)
    rng = np.random.default_rng(0)
    docs = [rng.integers(0, 6, size=50).tolist() for _ in range(10)] + [[2, 3, 0, 1], [2, 3, 1, 1], [2, 3, 4, 0]]
    store = build_datastore(docs, tmp_path / "ds", tokenizer_identity(target))
    prompt, sampling = [1, 2, 3], SamplingConfig(temperature=1.0)
    with torch.inference_mode():
        p1 = probabilities(target.model(torch.tensor([prompt])).logits[0, -1], sampling)
        batch = torch.cat([torch.tensor([prompt]).expand(6, -1), torch.arange(6)[:, None]], 1)
        p2 = probabilities(target.model(batch).logits[:, -1], sampling)  # [6, 6]
    exact = (p1[:, None] * p2).flatten()
    gen = SpeculativeGenerator(target, method="retrieval", datastore=store, budget=6)
    assert len(gen.drafter.propose(DraftContext(prompt, 1, sampling, None))) > 2  # several siblings drafted
    counts = torch.zeros(36)
    # enough draws to catch a second token verified against the wrong context (stat_power)
    for seed in range(draws_for_power(exact, slipped_pair(exact.view(6, 6)))):
        out = gen.generate(prompt, max_new_tokens=2, temperature=1.0, seed=seed)
        counts[out.token_ids[0] * 6 + out.token_ids[1]] += 1
    assert pooled_chisquare(counts, exact) > ALPHA


def test_html_is_stripped_to_text():
    page = ("<html><head><title>x</title><style>p {}</style></head><body>"
            "<div class='related' role='navigation'><ul><li>index</li><div>next</div></ul></div>"
            "<h1>Title<a class='headerlink'>\u00b6</a></h1>\n  <p>Some <b>bold</b>\n   &amp; text.</p>"
            "<script>var a;</script><pre>def f():\n    return 1</pre><div class='footer'>(c)</div></body></html>")
    assert html_to_text(page) == "Title\n\nSome bold & text.\n\ndef f():\n    return 1"


def test_cli_hook_adds_datastore_build():
    parser = argparse.ArgumentParser(prog="verispec")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["datastore", "build", "--model", "m", "--from", "a.txt", "docs/", "--out", "ds",
                              "--generate", "4"])
    assert args.sources == ["a.txt", "docs/"] and args.out == "ds" and args.generate == 4 and callable(args.func)


# --- the real model -------------------------------------------------------------------------

@pytest.mark.real
def test_real_model_greedy_equals_generate(smol, tmp_path):
    import sysconfig
    from pathlib import Path

    from verispec.datastore import corpus_files, tokenize_files
    from test_real_model import check_real_greedy

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = corpus_files([stdlib / f for f in ("argparse.py", "dataclasses.py", "functools.py", "json/__init__.py")])
    store = build_datastore(tokenize_files(smol.tokenizer, files), tmp_path / "ds", tokenizer_identity(smol))
    assert check_real_greedy("retrieval", datastore=store) > 1.0  # some drafts are accepted
