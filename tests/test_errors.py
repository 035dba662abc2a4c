"""Bad input gets one clear error before any work."""
from __future__ import annotations

import pytest

import verispec
from verispec import SpeculativeGenerator
from conftest import tiny_llama


def test_unknown_method(tiny):
    with pytest.raises(ValueError, match="unknown method 'nope'.*prompt-lookup"):
        SpeculativeGenerator(tiny, method="nope")


def test_unknown_option(tiny):
    with pytest.raises(ValueError, match="no option.*max_ngram"):
        SpeculativeGenerator(tiny, method="prompt-lookup", ngram=3)


def test_draft_model_needs_a_draft(tiny):
    with pytest.raises(ValueError, match="needs a draft model"):
        SpeculativeGenerator(tiny, method="draft-model")


def test_draft_vocab_mismatch(tiny):
    with pytest.raises(ValueError, match="vocabulary differs.*universal"):
        SpeculativeGenerator(tiny, method="draft-model", draft=tiny_llama(vocab=50))


@pytest.mark.parametrize("prompt", ["", []])
def test_empty_prompt(tiny, prompt):
    with pytest.raises(ValueError, match="prompt is empty"):
        SpeculativeGenerator(tiny).generate(prompt)


def test_text_prompt_without_tokenizer(tiny):
    with pytest.raises(ValueError, match="no tokenizer"):
        SpeculativeGenerator(tiny).generate("hello")


def test_out_of_vocab_prompt(tiny):
    with pytest.raises(ValueError, match=r"in \[0, 96\)"):
        SpeculativeGenerator(tiny).generate([1, 500])


@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_bad_max_new_tokens(tiny, n):
    with pytest.raises(ValueError, match="max_new_tokens must be a positive integer"):
        SpeculativeGenerator(tiny).generate([1, 2], max_new_tokens=n)


def test_context_overflow_before_any_work(tiny):
    gen = SpeculativeGenerator(tiny)  # tiny context: 256 positions
    with pytest.raises(ValueError, match="exceeds the model's context of 256"):
        gen.generate([1] * 200, max_new_tokens=57)
    assert gen.target.cached_len == 0


@pytest.mark.parametrize("bad", [dict(temperature=-0.5), dict(top_p=0), dict(top_k=-1)])
def test_invalid_sampling(tiny, bad):
    with pytest.raises(ValueError):
        SpeculativeGenerator(tiny).generate([1, 2], **bad)


def test_methods_listed():
    assert {"ar", "prompt-lookup", "draft-model"} <= set(verispec.methods())


def test_compare_explains_reduced_precision_differences(capsys):
    from types import SimpleNamespace

    from verispec.cli import print_stats

    stats = SimpleNamespace(new_tokens=4, wall_time_s=1.0, tokens_per_s=4.0, target_passes=2, mean_accepted_tokens=2.0,
                            drafted_tokens=4, accepted_tokens=2, acceptance_rate=0.5,
                            acceptance_rate_per_position=[0.5], time_s={k: 0.1 for k in
                                                                        ("prefill", "draft", "target", "accept")},
                            time_other_s=0.0)
    base = SimpleNamespace(new_tokens=4, tokens_per_s=2.0)
    print_stats("prompt-lookup", stats, base, identical=False, dtype="bfloat16")
    lines = capsys.readouterr().err.splitlines()
    assert "identical to ar: no" in lines[-2] and "--dtype float32 checks exactness" in lines[-1]
    print_stats("prompt-lookup", stats, base, identical=False, dtype="float32")
    assert "--dtype float32" not in capsys.readouterr().err  # in float32 a difference is a real one
    print_stats("prompt-lookup", stats, base, identical=True, dtype="bfloat16")
    assert "round differently" not in capsys.readouterr().err
