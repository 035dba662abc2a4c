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
    assert "identical to ar: no" in lines[-2] and "--exact makes them round as one-token passes" in lines[-1]
    print_stats("prompt-lookup", stats, base, identical=False, dtype="float32")
    assert "--exact" not in capsys.readouterr().err  # in float32 a difference is a real one
    print_stats("prompt-lookup", stats, base, identical=False, dtype="bfloat16", exact=True)
    assert "round differently" not in capsys.readouterr().err  # in exact mode too
    print_stats("prompt-lookup", stats, base, identical=True, dtype="bfloat16")
    assert "round differently" not in capsys.readouterr().err
    print_stats("prompt-lookup", stats, base, identical=False, dtype="float32", independent_sampling=True)
    assert "--rule gumbel keeps the tokens" in capsys.readouterr().err  # sampling: the distribution is kept


# ------------------------------------------------------------------ option values (CLI --option / --rule-option)

@pytest.mark.parametrize("method,options,message", [
    ("prompt-lookup", {"k": "abc"}, r"method 'prompt-lookup': option k='abc' is not valid: k takes an integer or one of 'auto'"),
    ("prompt-lookup", {"k": 2.5}, r"option k=2.5 .* k takes an integer"),
    ("prompt-lookup", {"max_ngram": True}, r"option max_ngram=True .* takes an integer"),
    ("lookahead", {"W": 1.5}, r"method 'lookahead': option W=1.5 .* W takes an integer"),
    ("recycling", {"warm_start": "yes"}, r"method 'recycling': option warm_start='yes' .* takes True or False"),
    ("recycling", {"tree": 3}, r"method 'recycling': option tree=3 .* a list of lists of integers or None"),
    ("recycling", {"tree": [[0], "x"]}, r"option tree=\[\[0\], 'x'\] .* a list of lists of integers"),
    ("recycling", {"nodes": "8"}, r"option nodes='8' .* an integer"),
])
def test_option_of_the_wrong_type_names_option_method_and_type(tiny, method, options, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeGenerator(tiny, method=method, **options)


def test_option_value_refused_by_the_method_names_the_method(tiny):
    with pytest.raises(ValueError, match=r"method 'draft-model': tree must be 'chain' .* got 'wide'"):
        SpeculativeGenerator(tiny, method="draft-model", draft=tiny, tree="wide")
    with pytest.raises(ValueError, match=r"method 'draft-model': option tree=\[\[0\], \['a'\]\] is not valid: tree takes "
                                         r"a string or a list of lists of integers or None"):
        SpeculativeGenerator(tiny, method="draft-model", draft=tiny, tree=[[0], ["a"]])
    with pytest.raises(ValueError, match=r"method 'draft-model': a static tree is a list of non-empty paths of ranks"):
        SpeculativeGenerator(tiny, method="draft-model", draft=tiny, tree=[[0], [-1]])
    with pytest.raises(ValueError, match=r"method 'recycling': static tree path \[5, 0\] has no parent"):
        SpeculativeGenerator(tiny, method="recycling", tree=[[0], [5, 0]])


@pytest.mark.parametrize("rule_options,message", [
    ({"epsilon": "abc"}, r"rule 'typical': option epsilon='abc' is not valid: epsilon takes a number"),
    ({"nope": 1}, r"rule 'typical' has no option\(s\) nope; its options: epsilon, delta"),
])
def test_bad_rule_option(tiny, rule_options, message):
    with pytest.raises(ValueError, match=message):
        SpeculativeGenerator(tiny, rule="typical", rule_options=rule_options)


def test_check_options_reads_annotations_and_defaults():
    from verispec.options import check_options

    def make(self, target, k: int = 1, p: float | None = None, path: str | None = None, flag=False, free=None,
             paths: list[list[int]] | None = None):
        pass

    good = dict(k=3, p=1, path="x", flag=True, free=object(), paths=[[0], (1, 2)])
    check_options("method 'm'", make, good)  # an int passes for a float; an unannotated None default takes anything
    for key, value, expected in [("p", "0.5", "a number or None"), ("flag", 1, "True or False"),
                                 ("paths", "[[0]]", "a list of lists of integers or None"), ("k", None, "an integer")]:
        with pytest.raises(ValueError, match=rf"method 'm': option {key}=.* {key} takes {expected}$"):
            check_options("method 'm'", make, {key: value})


def _cli(argv, monkeypatch, capsys, lm=None):
    import verispec.cli as cli

    if lm is not None:
        monkeypatch.setattr(verispec, "load_model", lambda *a, **k: lm)
    rc = cli.main(argv)
    return rc, capsys.readouterr().err.strip().splitlines()


@pytest.mark.parametrize("argv,message", [
    (["--method", "prompt-lookup", "--option", "k=abc"],
     "verispec: error: method 'prompt-lookup': option k='abc' is not valid: k takes an integer"),
    (["--method", "prompt-lookup", "--option", "k=[1,2"],
     "verispec: error: method 'prompt-lookup': option k='[1,2' is not valid: k takes an integer"),
    (["--method", "prompt-lookup", "--option", "nope=1"],
     "verispec: error: method 'prompt-lookup' has no option(s) nope; its options: k, max_ngram, min_ngram, "
     "tree_width, budget"),
    (["--method", "nope"], "verispec: error: unknown method 'nope'; known methods: "),
    (["--rule", "typical", "--rule-option", "delta=x"],
     "verispec: error: rule 'typical': option delta='x' is not valid: delta takes a number"),
])
def test_cli_bad_option_is_one_line_exit_2(tiny, monkeypatch, capsys, argv, message):
    rc, err = _cli(["generate", "--model", "tiny", "--prompt", "hi", *argv], monkeypatch, capsys, lm=tiny)
    assert rc == 2 and len(err) == 1 and err[0].startswith(message)


@pytest.mark.parametrize("argv,message", [
    (["--option", "k"], "verispec: error: --option takes KEY=VALUE (e.g. k=5), got 'k'"),
    (["--option", "=3"], "verispec: error: --option takes KEY=VALUE (e.g. k=5), got '=3'"),
    (["--rule-option", "epsilon"], "verispec: error: --rule-option takes KEY=VALUE (e.g. k=5), got 'epsilon'"),
])
def test_cli_malformed_option_fails_before_loading_the_model(monkeypatch, capsys, argv, message):
    def no_loading(*a, **k):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(verispec, "load_model", no_loading)
    rc, err = _cli(["generate", "--model", "x", "--prompt", "hi", *argv], monkeypatch, capsys)
    assert rc == 2 and err == [message]


def test_cuda_device_without_cuda_is_a_clear_error():
    import torch

    from verispec.models import resolve_device

    if torch.cuda.is_available():
        with pytest.raises(ValueError, match=r"only cuda:0\.\.cuda:"):
            resolve_device(f"cuda:{torch.cuda.device_count()}")
    else:
        with pytest.raises(ValueError, match="sees no CUDA device; use --device cpu"):
            resolve_device("cuda:7")
