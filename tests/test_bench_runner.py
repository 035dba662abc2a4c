"""The bench end to end on tiny random models: answer layout, peers, report, resume, CLI."""
from __future__ import annotations

import json

import pytest
import torch

from verispec.bench import peers, report, runner
from verispec.bench.cli import parse_method_options
from verispec.bench.runner import BenchConfig, read_answers, run_bench
from conftest import tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["write a poem about a cat", "now make it rhyme"]},
    {"question_id": 131, "category": "coding", "turns": ["sort a list", "and reverse it"]},
    {"question_id": 161, "category": "translation", "turns": ["translate: der Hund schläft"]},
    {"question_id": 321, "category": "qa", "turns": ["who wrote hamlet?"]},
]
METHODS = ["ar", "prompt-lookup", "hf-greedy", "hf-prompt-lookup"]
# Spec-Bench's evaluation/eval.py writes exactly these keys
SPEC_BENCH_KEYS = {"question_id", "category", "answer_id", "model_id", "choices", "tstamp"}
SPEC_BENCH_CHOICE_KEYS = {"index", "turns", "decoding_steps", "new_tokens", "wall_time", "accept_lengths"}


class CharFormatter:
    """Stands in for a tokenizer's chat template on the tiny 96-token models: one id per
    character, the conversation's messages joined; answers decode ids to characters."""

    chat_template = True

    def encode(self, messages):
        text = "|".join(f"{m['role'][0]}:{m['content'][:24]}" for m in messages)
        return [1 + ord(c) % 90 for c in text]

    def answer(self, ids):
        return "".join(chr(33 + t % 90) for t in ids)


@pytest.fixture(scope="module")
def tiny_lm():
    return tiny_llama(seed=3)


@pytest.fixture()
def questions(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    return path


def run(tiny_lm, questions, out, **kw):
    objects = {k: kw.pop(k) for k in list(kw) if k in ("draft", "universal_draft", "report")}
    config = BenchConfig(out=out, questions=str(questions), methods=kw.pop("methods", METHODS),
                         max_new_tokens=kw.pop("max_new_tokens", 12), **kw)
    return run_bench(config, lm=tiny_lm, formatter=CharFormatter(), progress=False, **objects)


def test_answer_files_follow_spec_bench_layout(tiny_lm, questions, tmp_path):
    out = tmp_path / "run"
    # the run is given the tiny model, so it names that one (and the dtype its weights really have)
    result = run(tiny_lm, questions, out, model=tiny_lm.name)
    assert (result.questions, result.ran, result.skipped, result.interrupted) == (4, 4, 0, False)
    used_dtype = str(next(tiny_lm.model.parameters()).dtype).removeprefix("torch.")
    fmt = CharFormatter()
    for method in METHODS:
        records = read_answers(out / f"{method}.jsonl")
        assert [r["question_id"] for r in records] == [81, 131, 161, 321]
        for r, q in zip(records, QUESTIONS):
            assert SPEC_BENCH_KEYS <= set(r) and r["category"] == q["category"]
            assert isinstance(r["tstamp"], float) and r["model_id"] == f"{tiny_lm.name}-{method}-{used_dtype}"
            (choice,) = r["choices"]
            assert SPEC_BENCH_CHOICE_KEYS <= set(choice) and choice["index"] == 0
            n = len(q["turns"])
            assert all(len(choice[k]) == n for k in ("turns", "decoding_steps", "new_tokens", "wall_time"))
            ids = r["verispec"]["token_ids"]
            assert choice["new_tokens"] == [len(t) for t in ids] == [12] * n  # no EOS on the tiny model
            assert choice["turns"] == [fmt.answer(t) for t in ids]
            assert sum(choice["accept_lengths"]) == sum(choice["new_tokens"])  # tokens per target pass
            assert sum(choice["decoding_steps"]) == len(choice["accept_lengths"])
            assert all(isinstance(x, int) and x >= 1 for x in choice["accept_lengths"])
            assert all(w > 0 for w in choice["wall_time"])
            # the second turn is asked after the first answer, as Spec-Bench does
            if n == 2:
                conv = [{"role": "user", "content": q["turns"][0]},
                        {"role": "assistant", "content": choice["turns"][0]},
                        {"role": "user", "content": q["turns"][1]}]
                assert r["verispec"]["prompt_tokens"][1] == len(fmt.encode(conv))
    # Spec-Bench's speed.py arithmetic on the raw files gives the report's speedup
    assert _spec_bench_speedup(out / "prompt-lookup.jsonl", out / "ar.jsonl") == pytest.approx(
        json.loads((out / "metrics.json").read_text())["methods"]["prompt-lookup"]["overall"]["speedup"])


def test_a_gumbel_run_checks_sampled_outputs_against_ar(tiny_lm, questions, tmp_path):
    """--rule gumbel: every verispec method samples with the same seeded noise, so at temperature > 0
    their outputs are compared with ar's like greedy ones (and equal)."""
    out = tmp_path / "run"
    draft = tiny_llama(seed=3, layers=1)
    run(tiny_lm, questions, out, methods=["ar", "prompt-lookup", "draft-model"], temperature=0.9, rule="gumbel",
        draft=draft)
    summary = json.loads((out / "metrics.json").read_text())
    for method in ("prompt-lookup", "draft-model"):
        loss = summary["methods"][method]["overall"]["lossless"]
        assert (loss["compared"], loss["identical"]) == (4, 4), method
    ar = read_answers(out / "ar.jsonl")
    greedy = tmp_path / "greedy"
    run(tiny_lm, questions, greedy, methods=["ar"])
    assert [r["verispec"]["token_ids"] for r in ar] != [r["verispec"]["token_ids"] for r in read_answers(greedy / "ar.jsonl")]
    text = (out / "report.md").read_text()
    assert "## Losslessness (gumbel sampling)" in text and "rule `gumbel` for every verispec method" in text
    with pytest.raises(ValueError, match="rule"):  # a folder is one run: no mixing of rules in it
        run(tiny_lm, questions, out, methods=["ar"], temperature=0.9)


def test_exact_mode_follows_the_targets_dtype(questions, tmp_path):
    """--exact's default (auto): a bfloat16 target on the CPU runs in exact mode, recorded and reported."""
    lm = tiny_llama(seed=3)
    lm.model.to(torch.bfloat16)
    out = tmp_path / "run"
    run(lm, questions, out, methods=["ar", "prompt-lookup"])
    info = json.loads((out / "run.json").read_text())
    assert info["exact"] == "auto" and info["exact_mode"] is True
    assert "exact mode (row-invariant target passes)" in (out / "report.md").read_text()
    summary = json.loads((out / "metrics.json").read_text())
    loss = summary["methods"]["prompt-lookup"]["overall"]["lossless"]
    assert loss["identical"] == loss["compared"] == 4


def _spec_bench_speedup(path, base_path):
    """Spec-Bench evaluation/speed.py's formula (with new_tokens for the baseline's tokens too)."""
    def speeds(p):
        out = []
        for line in open(p):
            c = json.loads(line)["choices"][0]
            out.append(sum(c["new_tokens"]) / sum(c["wall_time"]))
        return sum(out) / len(out)
    return speeds(path) / speeds(base_path)


def test_greedy_methods_and_peers_agree_and_report_is_written(tiny_lm, questions, tmp_path):
    out = tmp_path / "run"
    run(tiny_lm, questions, out)
    summary = json.loads((out / "metrics.json").read_text())
    for method in METHODS[1:]:
        loss = summary["methods"][method]["overall"]["lossless"]
        assert (loss["compared"], loss["identical"]) == (4, 4), method  # float32: all equal to ar
    assert summary["methods"]["hf-greedy"]["overall"]["mean_accepted_tokens"] == 1.0
    assert summary["methods"]["ar"]["overall"]["speedup"] == pytest.approx(1.0)
    text = (out / "report.md").read_text()
    assert "| Method | Multi-turn Conversation (2) | Translation (1) | Question Answering (1) |" in text
    assert "#Mean Accepted Tokens" in text and "## Environment" in text
    for png in report.CHARTS.values():
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in text
    for method in METHODS:  # a trace page for the first question of each task, linked from the report
        for task in ("mt_bench", "translation", "qa"):
            page = runner.trace_path(out, method, task)
            assert page.is_file() and f"(traces/{method}/{task}.html)" in text


def test_peer_measurements_line_up(tiny_lm):
    prompt = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4]
    greedy = peers.HFPeer("hf-greedy", tiny_lm).generate(prompt, 16)
    assert greedy.stats.accept_lengths == [1] * 16 and greedy.kinds == ["target"] * 16
    lookup = peers.HFPeer("hf-prompt-lookup", tiny_lm).generate(prompt, 16)
    assert lookup.token_ids == greedy.token_ids
    assert sum(lookup.stats.accept_lengths) == 16 and lookup.stats.drafted_tokens > 0
    # the target as its own assistant: every candidate accepted, a bonus token after each run
    assisted = peers.HFPeer("hf-assisted", tiny_lm, draft=tiny_lm, num_assistant_tokens=4,
                            assistant_confidence_threshold=0.0).generate(prompt, 16)
    assert assisted.token_ids == greedy.token_ids
    assert assisted.stats.mean_accepted_tokens > 3 and assisted.stats.acceptance_rate == 1.0
    assert assisted.kinds[:5] == ["accepted"] * 4 + ["bonus"]
    assert assisted.stats.time_s["draft"] > 0 and assisted.stats.time_s["target"] > 0


def test_peer_steps_measured_from_inputs_and_stream():
    import torch

    prompt = [5, 6, 7]
    inputs = [torch.tensor([[5, 6, 7, 40, 41]]), torch.tensor([[9, 42, 43, 44]]), torch.tensor([[44]])]
    emitted = [torch.tensor([[40, 41, 9]]), torch.tensor([[42, 50]]), torch.tensor([[51]])]
    stats, kinds = peers.measure_steps(prompt, [40, 41, 9, 42, 50, 51], inputs, emitted)
    assert kinds == ["accepted", "accepted", "bonus", "accepted", "recovered", "target"]
    assert stats.accept_lengths == [3, 2, 1] and stats.drafted_per_position == [2, 2, 1]
    assert stats.accepted_per_position == [2, 1, 0]
    stats, kinds = peers.measure_steps(prompt, [40], inputs[:1], [])  # records that do not line up: unknown
    assert stats.accept_lengths == [] and kinds == []


def test_planted_difference_is_reported(tiny_lm, questions, tmp_path, monkeypatch):
    original = peers.HFPeer.generate
    tail = [1 + ord(c) % 90 for c in "and reverse it"]  # how CharFormatter ends question 131's second turn

    def planted(self, prompt_ids, max_new_tokens, temperature=0.0, seed=None):
        out = original(self, prompt_ids, max_new_tokens, temperature, seed)
        if self.name == "hf-greedy" and prompt_ids[-len(tail):] == tail:
            out.token_ids[5] = (out.token_ids[5] + 1) % 96
        return out

    monkeypatch.setattr(peers.HFPeer, "generate", planted)
    out = tmp_path / "run"
    run(tiny_lm, questions, out, methods=["ar", "hf-greedy"])
    loss = json.loads((out / "metrics.json").read_text())["methods"]["hf-greedy"]["overall"]["lossless"]
    assert (loss["compared"], loss["identical"]) == (4, 3)
    assert [(d["question_id"], d["turn"], d["position"]) for d in loss["differences"]] == [(131, 2, 5)]
    assert "q131 turn 2 @token 5" in (out / "report.md").read_text()


def test_interrupted_run_keeps_finished_questions_and_resumes(tiny_lm, questions, tmp_path, monkeypatch):
    out = tmp_path / "run"
    calls = []
    original = runner.VerispecMethod.generate

    def interrupt_on_question_3(self, prompt_ids, *args, **kwargs):
        calls.append(self.name)
        if len(calls) > 2 + 2 * 2 + 1:  # warm-up (2 methods), q81 and q131 (2 turns each), then q161
            raise KeyboardInterrupt
        return original(self, prompt_ids, *args, **kwargs)

    monkeypatch.setattr(runner.VerispecMethod, "generate", interrupt_on_question_3)
    first = run(tiny_lm, questions, out, methods=["ar", "prompt-lookup"])
    assert first.interrupted and first.ran == 1
    saved = {m: read_answers(out / f"{m}.jsonl") for m in ("ar", "prompt-lookup")}
    assert all([r["question_id"] for r in recs] == [81] for recs in saved.values())
    assert (out / "report.md").is_file()  # a report of what finished

    # a torn last line (killed mid-write) is cut off, not glued to the next record
    with open(out / "ar.jsonl", "a") as fh:
        fh.write('{"question_id": 131, "categ')
    monkeypatch.setattr(runner.VerispecMethod, "generate", original)
    again = run(tiny_lm, questions, out, methods=["ar", "prompt-lookup"])
    assert (again.skipped, again.ran, again.interrupted) == (1, 3, False)
    for m in ("ar", "prompt-lookup"):
        records = read_answers(out / f"{m}.jsonl")
        assert [r["question_id"] for r in records] == [81, 131, 161, 321]
        assert records[0]["answer_id"] == saved[m][0]["answer_id"]  # finished work is not redone
    # adding a method later runs only that method
    third = run(tiny_lm, questions, out, methods=["ar", "prompt-lookup", "hf-greedy"])
    assert (third.skipped, third.ran) == (0, 4)
    assert len(read_answers(out / "ar.jsonl")) == 4 and len(read_answers(out / "hf-greedy.jsonl")) == 4
    # other settings cannot be mixed into the same folder
    with pytest.raises(ValueError, match="max_new_tokens"):
        run(tiny_lm, questions, out, methods=["ar"], max_new_tokens=8)


def test_a_method_that_raises_is_recorded_and_the_run_goes_on(tiny_lm, questions, tmp_path, monkeypatch):
    original = runner.VerispecMethod.generate
    broken = {"on": True}

    def fails_on_question_161(self, prompt_ids, *args, **kwargs):
        if broken["on"] and self.name == "prompt-lookup" and list(prompt_ids) == q161_prompt:
            raise RuntimeError("planted failure")
        return original(self, prompt_ids, *args, **kwargs)

    q161 = next(q for q in QUESTIONS if q["question_id"] == 161)
    q161_prompt = CharFormatter().encode([{"role": "user", "content": q161["turns"][0]}])
    monkeypatch.setattr(runner.VerispecMethod, "generate", fails_on_question_161)
    out = tmp_path / "run"
    result = run(tiny_lm, questions, out, methods=["ar", "prompt-lookup"])
    assert not result.interrupted and result.ran == 4
    assert [r["question_id"] for r in read_answers(out / "prompt-lookup.jsonl")] == [81, 131, 321]
    assert len(read_answers(out / "ar.jsonl")) == 4
    failed = [json.loads(line) for line in (out / "failures.jsonl").read_text().splitlines()]
    assert [(f["method"], f["question_id"]) for f in failed] == [("prompt-lookup", 161)]
    text = (out / "report.md").read_text()
    assert "## Failures" in text and "planted failure" in text
    assert "failures" not in json.loads((out / "metrics.json").read_text())["methods"]  # not read as a method
    broken["on"] = False  # a rerun tries the failed question again
    again = run(tiny_lm, questions, out, methods=["ar", "prompt-lookup"])
    assert again.ran == 1 and len(read_answers(out / "prompt-lookup.jsonl")) == 4


def test_repeats_give_medians_and_spread(tiny_lm, questions, tmp_path):
    out = tmp_path / "run"
    run(tiny_lm, questions, out, methods=["ar", "prompt-lookup"], repeats=3, tasks=["qa"])
    (r,) = read_answers(out / "prompt-lookup.jsonl")
    walls = r["verispec"]["wall_time_repeats"]
    assert len(walls) == 1 and len(walls[0]) == 3 and r["verispec"]["repeats_identical"]
    assert r["choices"][0]["wall_time"][0] == pytest.approx(sorted(walls[0])[1])
    overall = json.loads((out / "metrics.json").read_text())["methods"]["prompt-lookup"]["overall"]
    assert len(overall["speedup_repeats"]) == 3


def test_sampling_runs_are_reproducible(tiny_lm, questions, tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    for out in (a, b):
        run(tiny_lm, questions, out, methods=["ar", "prompt-lookup"], temperature=1.0, seed=7, tasks=["qa"])
    ids = [read_answers(o / "prompt-lookup.jsonl")[0]["verispec"]["token_ids"] for o in (a, b)]
    assert ids[0] == ids[1]
    summary = json.loads((a / "metrics.json").read_text())
    assert summary["methods"]["prompt-lookup"]["overall"]["lossless"] is None
    assert "Not checked: with temperature > 0" in (a / "report.md").read_text()


def test_options_reach_the_methods(tiny_lm, questions, tmp_path):
    out = tmp_path / "run"
    run(tiny_lm, questions, out, methods=["ar", "prompt-lookup", "hf-prompt-lookup"], tasks=["qa"],
        options={"prompt-lookup": {"k": 2}, "hf-prompt-lookup": {"prompt_lookup_num_tokens": 3}})
    for method, k in (("prompt-lookup", 2), ("hf-prompt-lookup", 3)):
        (r,) = read_answers(out / f"{method}.jsonl")
        assert max(r["choices"][0]["accept_lengths"]) <= k + 1
        assert len(r["verispec"]["drafted_per_position"][0]) <= k
    with pytest.raises(ValueError, match="no option"):
        run(tiny_lm, questions, tmp_path / "bad", methods=["ar", "prompt-lookup"], options={"prompt-lookup": {"kk": 1}})
    with pytest.raises(ValueError, match="hf-assisted needs a draft"):
        run(tiny_lm, questions, tmp_path / "bad2", methods=["ar", "hf-assisted"])


def test_draft_methods_get_the_draft(tiny_lm, questions, tmp_path):
    out = tmp_path / "run"
    run(tiny_lm, questions, out, methods=["ar", "draft-model", "hf-assisted"], tasks=["qa"], draft=tiny_lm,
        options={"draft-model": {"k": 3, "min_confidence": 0.0}, "hf-assisted": {"num_assistant_tokens": 3,
                                                          "assistant_confidence_threshold": 0.0}})
    summary = json.loads((out / "metrics.json").read_text())["methods"]
    # the target drafting for itself: everything accepted, 4 tokens per target pass (up to the end)
    assert summary["draft-model"]["overall"]["mean_accepted_tokens"] == pytest.approx(12 / 3)
    assert summary["hf-assisted"]["overall"]["mean_accepted_tokens"] == pytest.approx(12 / 3)
    assert summary["draft-model"]["overall"]["lossless"]["share"] == 1.0


def test_method_options_parsing():
    assert parse_method_options(["prompt-lookup.k=5", "prompt-lookup.max_ngram=2", "hf-assisted.x=abc"]) == {
        "prompt-lookup": {"k": 5, "max_ngram": 2}, "hf-assisted": {"x": "abc"}}
    with pytest.raises(ValueError, match="METHOD.KEY=VALUE"):
        parse_method_options(["k=5"])
    with pytest.raises(ValueError, match="not in --methods"):
        parse_method_options(["draft-model.k=5"], methods=["ar", "prompt-lookup"])


def test_cli_bench_and_report(tiny_lm, questions, tmp_path, capsys):
    from verispec.cli import build_parser, main

    args = build_parser().parse_args(["bench", "--model", "x", "--per-task", "2", "--out", str(tmp_path)])
    assert args.func.__name__ == "cmd_bench" and args.per_task == 2
    args = build_parser().parse_args(["bench", "report", str(tmp_path)])
    assert args.func.__name__ == "cmd_report" and args.dir == str(tmp_path)
    assert main(["bench", "--model", "x"]) == 2
    assert "needs --out" in capsys.readouterr().err
    assert main(["bench", "report", str(tmp_path / "nothing")]) == 2

    out = tmp_path / "run"
    run(tiny_lm, questions, out, methods=["ar", "prompt-lookup"], tasks=["qa"], report=False)
    assert not (out / "report.md").exists()
    assert main(["bench", "report", str(out)]) == 0
    assert (out / "report.md").is_file() and (out / "speedup.png").is_file()
    assert "Question Answering" in (out / "report.md").read_text()


def _byte_tokenizer(vocab, corpus):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


class TokLM:
    eos_token_ids: list = []

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer, self.name = model, tokenizer, "tok"

    def decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=True)


def test_universal_assisted_peer_with_another_tokenizer():
    a = _byte_tokenizer(300, "hello world the cat sat on the mat")
    b = _byte_tokenizer(280, "a quick brown fox jumps over the dogs")
    assert a.get_vocab() != b.get_vocab()
    target = TokLM(tiny_llama(vocab=len(a)).model, a)
    draft = TokLM(tiny_llama(vocab=len(b), layers=1, seed=1).model, b)
    prompt = a("hello world the cat")["input_ids"]
    universal = peers.HFPeer("hf-universal", target, draft=draft, num_assistant_tokens=4).generate(prompt, 12)
    assert universal.token_ids == peers.HFPeer("hf-greedy", target).generate(prompt, 12).token_ids
    assert sum(universal.stats.accept_lengths) == 12 and universal.stats.drafted_tokens > 0
    with pytest.raises(ValueError, match="use hf-assisted"):
        peers.HFPeer("hf-universal", target, draft=TokLM(draft.model, a))


def test_assisted_peer_refuses_another_vocabulary(tiny_lm):
    with pytest.raises(ValueError, match="use hf-universal"):
        peers.HFPeer("hf-assisted", tiny_lm, draft=tiny_llama(vocab=80))


def test_method_variants_by_label(tiny):
    from verispec.bench.runner import base_method, build_method

    assert base_method("draft-model@static") == "draft-model" and base_method("ar") == "ar"
    variant = build_method("prompt-lookup@short", tiny, {"k": 3})
    assert variant.generator.drafter.k == 3
    with pytest.raises(ValueError, match="NAME@LABEL"):
        build_method("nope@x", tiny, {})
