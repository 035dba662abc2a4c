"""Distillation data at scale: batched decoding (finished rows leave the batch) and the
chunked, resumable, deduplicating dataset build."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from conftest import tiny_llama
from verispec.training import data as data_mod
from verispec.training.batched import Sampler, decode_batch
from verispec.training.data import build_dataset, iter_samples


def _generate_alone(model, prompt, n, eos=None):
    out = model.generate(input_ids=torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=eos)
    return out[0, len(prompt):].tolist()


def test_batched_greedy_rows_equal_each_prompt_decoded_alone():
    lm = tiny_llama()
    prompts = [[5, 6, 7], [9], [11, 12, 13, 14, 15, 16], [3, 3]]
    got = decode_batch(lm.model, prompts, 12, eos_ids=[], pad_id=0)
    for p, (row, ended) in zip(prompts, got):
        assert row == _generate_alone(lm.model, p, 12) and not ended


def test_a_row_that_ends_leaves_the_batch_and_the_others_go_on_unchanged():
    lm = tiny_llama()
    prompts = [[5, 6, 7], [9, 1], [11, 12, 13, 14]]
    free = [row for row, _ in decode_batch(lm.model, prompts, 10, eos_ids=[], pad_id=0)]
    eos = free[1][3]  # row 1 ends at its 4th token (and the others, where they emit it)
    got = decode_batch(lm.model, prompts, 10, eos_ids=[eos], pad_id=0)
    for row, (cut, ended) in zip(free, got):
        stop = row.index(eos) + 1 if eos in row else len(row)
        assert cut == row[:stop] and ended == (eos in row)
    assert len(got[1][0]) == 4


def test_sampled_rows_are_reproducible_for_a_seed_and_differ_across_seeds():
    lm = tiny_llama()
    prompts = [[5, 6, 7]] * 4
    a = decode_batch(lm.model, prompts, 8, [], 0, Sampler(temperature=1.0, top_p=0.9, seed=1))
    b = decode_batch(lm.model, prompts, 8, [], 0, Sampler(temperature=1.0, top_p=0.9, seed=1))
    c = decode_batch(lm.model, prompts, 8, [], 0, Sampler(temperature=1.0, top_p=0.9, seed=2))
    assert a == b and a != c
    assert len({tuple(r) for r, _ in a}) > 1  # rows of one batch draw independently


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.6, 0.3, 0.05, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {Sampler(top_p=0.8).draw(logits, g).item() for _ in range(200)}
    assert draws == {0, 1}


class _Writer:
    """Scripted user turns: message i is 'question number i', with scripted repeats."""

    def __init__(self, tok_encode, repeat_every: int = 5):
        self.i, self.encode, self.repeat_every = 0, tok_encode, repeat_every

    def __call__(self, prefix, rows, max_tokens, sampler):
        out = []
        for _ in range(rows):
            self.i += 1
            n = self.i - 1 if self.i % self.repeat_every == 0 else self.i  # every 5th repeats the one before
            out.append((self.encode(f"question number {' '.join(str(n))} please Assistant:"), True))
        return out


class _Tok:
    """A word-level tokenizer over a tiny vocabulary (enough for the builder's needs)."""

    pad_token_id = 0
    chat_template = None
    words = ["<pad>", "User:", "Assistant:", "question", "number", "please"] + [str(i) for i in range(10)]

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [self.words.index(w) for w in text.split()]}

    def decode(self, ids, skip_special_tokens=True):
        return " ".join(self.words[i] for i in ids).replace(" Assistant:", "\nAssistant:")


@pytest.fixture
def scripted_lm(monkeypatch):
    lm = tiny_llama(vocab=96)
    tok = _Tok()
    loaded = SimpleNamespace(model=lm.model, tokenizer=tok, name="tiny", eos_token_ids=[0])
    writer = _Writer(lambda t: tok(t)["input_ids"])
    real = data_mod.self_instruct_prompts
    monkeypatch.setattr(data_mod, "self_instruct_prompts", lambda *a, **k: real(*a, **k, write=writer))
    monkeypatch.setattr(data_mod, "encode_prompt", lambda lm_, t: tok("User: " + t + " Assistant:")["input_ids"])
    monkeypatch.setattr(data_mod, "tokenizer_identity", lambda lm_: {"vocab_hash": "tiny"})
    return loaded


def test_the_build_resumes_after_an_interruption_and_grows_to_a_larger_target(scripted_lm, tmp_path):
    out = tmp_path / "ds"
    kw = dict(max_new_tokens=6, batch_size=4, chunk_size=4, features=False, progress=False,
              guard=data_mod.EvalSetGuard())
    build_dataset(scripted_lm, out, answer_tokens=30, **kw)
    first = json.loads((out / "build.json").read_text())
    assert first["answer_tokens"] >= 30
    chunks = sorted(out.glob("chunk-*.pt"))
    chunks[-1].unlink()  # as if the build had been killed while writing its last chunk
    build_dataset(scripted_lm, out, answer_tokens=30, **kw)
    assert len(sorted(out.glob("chunk-*.pt"))) == len(chunks)
    build_dataset(scripted_lm, out, answer_tokens=60, **kw)  # a larger target grows it
    report = json.loads((out / "build.json").read_text())
    assert report["answer_tokens"] >= 60 and report["answer_tokens_per_s"] > 0
    samples = list(iter_samples(out))
    assert sum(len(s.ids) - s.prompt_len for s in samples) == report["answer_tokens"]
    prompts = [tuple(s.ids[:s.prompt_len].tolist()) for s in samples]
    assert len(prompts) == len(set(prompts))  # the writer's repeats were dropped
    answers = [tuple(s.ids[s.prompt_len:].tolist()) for s in samples]
    assert len(answers) == len(set(answers))


def test_a_build_with_other_settings_is_refused(scripted_lm, tmp_path):
    kw = dict(batch_size=4, chunk_size=4, features=False, progress=False, guard=data_mod.EvalSetGuard())
    build_dataset(scripted_lm, tmp_path / "ds", answer_tokens=10, max_new_tokens=6, **kw)
    with pytest.raises(ValueError, match="max_new_tokens"):
        build_dataset(scripted_lm, tmp_path / "ds", answer_tokens=10, max_new_tokens=8, **kw)
