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
