"""Library calls leave shared state as they found it: no hook left on the target model, torch's
global RNG untouched, no matplotlib backend chosen, no thread count set; progress goes to stderr."""
from __future__ import annotations

import json

import pytest
import torch

from verispec import SpeculativeGenerator
from verispec.config import SamplingConfig

from conftest import ScriptedDrafter, hf_greedy


class FeatureDrafter(ScriptedDrafter):
    """A feature drafter (like Medusa and EAGLE) without a trained head."""

    needs_features = True

    def begin(self, prompt):
        self.seen = 0

    def observe(self, tree, target_logits, verdict, new_tokens, features=None):
        assert features is not None
        self.seen += len(features)


class Boom(RuntimeError):
    pass


class FailingFeatureDrafter(FeatureDrafter):
    def propose(self, ctx):
        if len(ctx.tokens) > self.prompt_len + 3:
            raise Boom("drafter failed mid-generation")
        return super().propose(ctx)


def _hooks(lm) -> int:
    base = lm.model.base_model
    return len(base._forward_hooks) + len(base._forward_pre_hooks)


def test_feature_hook_is_removed_after_generation(tiny):
    prompt = [5, 17, 3, 44, 9, 21]
    ref = hf_greedy(tiny, prompt, 12)
    drafter = FeatureDrafter(ref, len(prompt), k=4, correct=2, vocab=96)
    gen = SpeculativeGenerator(tiny, drafter)
    assert _hooks(tiny) == 0
    out = gen.generate(prompt, max_new_tokens=12)
    assert out.token_ids == ref and drafter.seen == len(prompt) + len(ref) - 1  # the hook did its work
    assert len(tiny.model.base_model._forward_hooks) == 0 and _hooks(tiny) == 0  # and is gone
    assert gen.target.features is None
    gen.generate(prompt, max_new_tokens=12)  # a second generation captures again, and releases again
    assert drafter.seen == len(prompt) + len(ref) - 1 and _hooks(tiny) == 0


def test_feature_hook_is_removed_when_a_generation_fails(tiny):
    prompt = [1, 2, 3]
    ref = hf_greedy(tiny, prompt, 10)
    gen = SpeculativeGenerator(tiny, FailingFeatureDrafter(ref, len(prompt), k=2, correct=2, vocab=96))
    with pytest.raises(Boom):
        gen.generate(prompt, max_new_tokens=10)
    assert _hooks(tiny) == 0


def test_unseeded_sampling_leaves_the_global_rng_alone(tiny):
    gen = SpeculativeGenerator(tiny, "prompt-lookup")
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    for _ in range(2):
        gen.generate([1, 2, 3, 1, 2], max_new_tokens=12, temperature=1.0)
    assert torch.equal(torch.get_rng_state(), state)  # neither read nor re-seeded
    unseeded = SamplingConfig(temperature=1.0)
    assert gen._rng(unseeded).initial_seed() != gen._rng(unseeded).initial_seed()  # fresh OS entropy each call
    assert torch.equal(torch.get_rng_state(), state)
    seeded = [gen.generate([1, 2, 3], max_new_tokens=8, temperature=1.0, seed=7).token_ids for _ in range(2)]
    assert seeded[0] == seeded[1] and torch.equal(torch.get_rng_state(), state)


CHART_SCRIPT = """
import json, sys
import matplotlib
from verispec.bench.report import CHARTS, write_charts
summary = json.loads(sys.argv[2])
written = write_charts(__import__("pathlib").Path(sys.argv[1]), summary, {"ar": [], "prompt-lookup": []})
print(json.dumps({"written": sorted(written), "pyplot": "matplotlib.pyplot" in sys.modules,
                  "backend": matplotlib.rcParams["backend"]}))
"""


def test_charts_choose_no_matplotlib_backend(tmp_path):
    """In a fresh process whose user chose a backend (MPLBACKEND=svg): charts are written,
    pyplot is never imported and the backend is still the user's."""
    import os
    import subprocess
    import sys

    from verispec.bench.report import CHARTS

    summary = {"baseline": "ar", "tasks": ["qa"], "methods": {
        "ar": {"overall": {"speedup": 1.0, "time_split": {"draft": 0.0, "target": 0.9, "accept": 0.0, "other": 0.1}}},
        "prompt-lookup": {"qa": {"speedup": 1.5}, "overall": {"speedup": 1.5, "time_split": {
            "draft": 0.1, "target": 0.7, "accept": 0.1, "other": 0.1}}}}}
    done = subprocess.run([sys.executable, "-c", CHART_SCRIPT, str(tmp_path), json.dumps(summary)],
                          env={**os.environ, "MPLBACKEND": "svg"}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"written": ["speedup", "time_split"], "pyplot": False, "backend": "svg"}
    for name in result["written"]:
        assert (tmp_path / CHARTS[name]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_run_leaves_the_thread_count_alone(tmp_path):
    from verispec.bench.runner import BenchConfig, run_bench

    from conftest import tiny_llama

    questions = tmp_path / "question.jsonl"
    questions.write_text(json.dumps({"question_id": 1, "category": "qa", "turns": ["hi"]}) + "\n")

    class Formatter:
        chat_template = True

        def encode(self, messages):
            return [1 + ord(c) % 90 for c in "|".join(m["content"] for m in messages)]

        def answer(self, ids):
            return "".join(chr(33 + t % 90) for t in ids)

    before = torch.get_num_threads()
    config = BenchConfig(out=tmp_path / "run", questions=str(questions), methods=["ar"], max_new_tokens=4,
                         warmup=0, traces=False)
    assert not hasattr(config, "threads")  # the CLI's --threads sets it, not the library
    run_bench(config, lm=tiny_llama(seed=3), formatter=Formatter(), progress=False, report=False)
    assert torch.get_num_threads() == before


def test_bench_cli_sets_threads(monkeypatch):
    from verispec.bench import cli as bench_cli

    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    bench_cli.set_threads(None)
    bench_cli.set_threads(3)
    assert calls == [3]
    with pytest.raises(ValueError, match="--threads must be an integer >= 1"):
        bench_cli.set_threads(0)


def test_progress_goes_to_stderr(capsys):
    from verispec.progress import progress, say

    assert list(progress(range(3), "counting")) == [0, 1, 2]
    with progress(total=2, desc="bench", enabled=False) as bar:
        bar.set_description_str("quiet")
        bar.update()
    say("loading", "verispec bench")
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "counting" in captured.err and "verispec bench: loading" in captured.err and "quiet" not in captured.err
