"""Distillation data: prompts from local text, the evaluation-set guard, dataset chunks."""
from __future__ import annotations

import json

import pytest
import torch

from verispec.training.data import check_dataset_for, iter_samples, write_dataset
from verispec.training.prompts import EvalSetGuard, make_prompts
from conftest import tiny_llama

QUESTION = ("Compose an engaging travel blog post about a recent trip to Hawaii, highlighting cultural "
            "experiences and must-see attractions.")
PROSE = ("The module provides a way of using operating system dependent functionality. If you just want to "
         "read or write a file see open(), if you want to manipulate paths, see the os.path module, and if "
         "you want to read all the lines in all the files on the command line see the fileinput module. "
         "For creating temporary files and directories see the tempfile module.")


@pytest.fixture
def corpus(tmp_path):
    (tmp_path / "questions").mkdir()
    qfile = tmp_path / "questions" / "question.jsonl"
    qfile.write_text(json.dumps({"question_id": 81, "category": "writing", "turns": [QUESTION]}) + "\n")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text(f"{PROSE}\n\n{PROSE.replace('module', 'package')}\n")
    # a local file that happens to quote the evaluation question: its passages must never become prompts
    (docs / "b.txt").write_text(f"Here is a task people ask for. {QUESTION} It is a popular request among "
                                "writers who like travel and who write blogs about islands and culture.\n")
    (docs / "c.py").write_text('def add_numbers(a, b):\n    """Return the sum of two numbers given as input."""\n'
                               + "    total = a\n    total += b\n    if total < 0:\n        total = 0\n"
                               + "    return total\n")
    return docs, qfile


def test_prompts_are_varied_deterministic_and_never_quote_the_eval_set(corpus):
    docs, qfile = corpus
    guard = EvalSetGuard([qfile])
    prompts = make_prompts([docs], 60, seed=1, guard=guard)
    assert len(prompts) == 60 and prompts == make_prompts([docs], 60, seed=1, guard=guard)
    assert not any("travel blog post about a recent trip" in p for p in prompts)
    kinds = {p.split()[0] for p in prompts}
    assert len(kinds) >= 4  # summarise, explain, continue, translate, ... not one template
    assert any("def add_numbers" in p for p in prompts)


def test_guard_refuses_eval_questions(corpus):
    docs, qfile = corpus
    guard = EvalSetGuard([qfile])
    with pytest.raises(ValueError, match="Spec-Bench"):
        guard.check_prompt(f"Please answer: {QUESTION}")
    guard.check_prompt(PROSE)  # unrelated text passes
    with pytest.raises(ValueError, match="evaluation question set"):
        make_prompts([qfile], 4, guard=guard)


def test_dataset_round_trip_holds_the_targets_features(tmp_path):
    lm = tiny_llama()
    seqs = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13]]
    out = write_dataset(lm, tmp_path / "ds", seqs, [2, 1, 3], chunk_size=2)
    samples = list(iter_samples(out))
    assert [s.ids.tolist() for s in samples] == seqs and [s.prompt_len for s in samples] == [2, 1, 3]
    with torch.no_grad():
        ref = lm.model.model(input_ids=torch.tensor([seqs[0]])).last_hidden_state[0]
    torch.testing.assert_close(samples[0].features.float(), ref, atol=2e-2, rtol=2e-2)  # stored in bf16
    assert check_dataset_for(lm, out, need_features=True)["n_samples"] == 3
    with pytest.raises(ValueError, match="another tokenizer"):
        check_dataset_for(tiny_llama(vocab=50), out)
    with pytest.raises(ValueError, match="not a verispec training dataset"):
        check_dataset_for(lm, tmp_path)


def test_token_ranking_puts_answer_tokens_first():
    from verispec.training.data import Sample, token_ranking

    # token 5 fills the prompts, 7 and 3 the answers (7 more often); ties fall to the lower id
    samples = [Sample(torch.tensor([5, 5, 5, 7, 3, 7]), 3, None), Sample(torch.tensor([5, 5, 2, 7]), 3, None)]
    ranking = token_ranking(samples, 9).tolist()
    assert ranking[:5] == [7, 3, 5, 2, 0] and sorted(ranking) == list(range(9))


class _ScriptedWriter:
    """Stands in for the model's sampling of user turns: the scripted continuations, a batch at a time."""

    def __init__(self, rows: list[list[int]], eos: int):
        self.rows, self.eos = rows, eos

    def __call__(self, prefix, rows, max_tokens, sampler):
        batch, self.rows = self.rows[:rows], self.rows[rows:]
        batch += [[0]] * (rows - len(batch))  # an empty message once the script is spent
        return [(r, self.eos in r) for r in batch]


def _smol_tokenizer():
    from transformers import AutoTokenizer

    from verispec.models import fetch
    return AutoTokenizer.from_pretrained(fetch("smollm2-135m-instruct", progress=False))


@pytest.mark.real
def test_self_instruct_keeps_finished_distinct_clean_messages(corpus):
    from types import SimpleNamespace

    from verispec.training.self_instruct import self_instruct_prompts

    _, qfile = corpus
    tok = _smol_tokenizer()
    eos = tok.convert_tokens_to_ids("<|im_end|>")

    def msg(text, end=True):
        return tok(text, add_special_tokens=False)["input_ids"] + ([eos] if end else [])

    script = [msg("How do tides work?"), msg("how do tides work?"),  # a repeat, in other case
              msg("Write a haiku about autumn leaves.", end=False),  # never ended: cut off
              msg("Hi"),  # too short
              msg(f"Please do this: {QUESTION}"),  # quotes the evaluation set
              msg("Translate 'good morning' into French.")]
    lm = SimpleNamespace(tokenizer=tok, eos_token_ids=[eos], model=None)
    got = self_instruct_prompts(lm, 2, guard=EvalSetGuard([qfile]), batch_size=3, write=_ScriptedWriter(script, eos))
    assert got == ["How do tides work?", "Translate 'good morning' into French."]
    with pytest.raises(ValueError, match="only 1 usable"):
        self_instruct_prompts(lm, 2, batch_size=3, write=_ScriptedWriter([msg("Only one usable message here.")], eos))


@pytest.mark.real
def test_self_instruct_on_the_real_model_writes_user_turns_in_the_bench_layout(real_model_dir):
    import verispec
    from verispec.bench.runner import ChatFormatter
    from verispec.training.self_instruct import self_instruct_prompts, user_turn_prefix

    # its own copy: self-instruct is checked in bfloat16, not on the shared float32 model
    smol = verispec.load_model("smollm2-135m-instruct", dtype="bfloat16")
    prefix = user_turn_prefix(smol)
    assert ChatFormatter(smol).encode([{"role": "user", "content": "Hello there"}])[:len(prefix)] == prefix
    prompts = self_instruct_prompts(smol, 4, seed=3, batch_size=4, max_tokens=48)
    assert len(set(prompts)) == 4 and all(len(p.split()) >= 3 for p in prompts)
    assert not any("<|im_" in p for p in prompts)  # special tokens are not part of the message


def test_several_datasets_train_together_each_holding_out_its_own(tmp_path):
    from types import SimpleNamespace

    from verispec.training.cli import ensure_data
    from verispec.training.common import load_split

    lm = tiny_llama()
    a = write_dataset(lm, tmp_path / "a", [[1, 2, 3]] * 4, [1] * 4, chunk_size=2)
    b = write_dataset(lm, tmp_path / "b", [[4, 5, 6, 7]] * 6, [2] * 6, chunk_size=2)
    train, held = load_split([a, b])
    assert [len(s.ids) for s in held] == [3, 3, 4, 4]  # the last chunk of each
    assert len(train) == 2 + 4
    args = SimpleNamespace(data=[str(a), str(tmp_path / "missing")], model="m", samples=4, seed=0)
    with pytest.raises(ValueError, match="build each of several"):
        ensure_data(args, lm, features=True)
    assert ensure_data(SimpleNamespace(data=[str(a), str(b)], model="m", samples=4, seed=0), lm) == [a, b]
