"""The vLLM bench peers without vLLM: how vLLM's per-step counts become verispec's stats,
the engine settings each peer asks for, and the errors. Starting vLLM itself: test_vllm.py."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from verispec.assets import DRAFTERS
from verispec.bench import runner
from verispec.bench.vllm_peer import VLLM_PEERS, VLLMPeer, step_stats, vllm_python

SMOL_HEADS = DRAFTERS / "smollm2-135m-instruct"


@pytest.fixture
def fake_vllm(monkeypatch):
    """Any existing interpreter stands in for the vLLM environment: nothing here starts it."""
    monkeypatch.setenv("VERISPEC_VLLM_PYTHON", sys.executable)


def test_plain_decoding_is_one_token_per_pass():
    stats = step_stats([5, 6, 7], None, None, speculative=False)
    assert (stats.new_tokens, stats.target_passes, stats.accept_lengths) == (3, 3, [1, 1, 1])
    assert stats.drafted_tokens == stats.accepted_tokens == 0


def test_draft_steps_follow_the_prefill_token():
    # prefill emits 1; steps accepted 2 of 3 (emits 3), 0 of 3 (1), 3 of 3 (4): 9 tokens
    stats = step_stats(list(range(9)), [2, 0, 3], [3, 3, 3], speculative=True)
    assert stats.accept_lengths == [1, 3, 1, 4]
    assert (stats.new_tokens, stats.target_passes, stats.drafted_tokens, stats.accepted_tokens) == (9, 4, 9, 5)
    assert stats.drafted_per_position == [3, 3, 3] and stats.accepted_per_position == [2, 2, 1]
    assert stats.mean_accepted_tokens == 9 / 4


def test_steps_without_drafts_are_the_tokens_left_over():
    # an n-gram miss drafts nothing and vLLM records no step for it: 2 such passes here
    stats = step_stats(list(range(6)), [2], [4], speculative=True)
    assert stats.accept_lengths == [1, 3, 1, 1] and stats.target_passes == 4 and stats.drafted_tokens == 4


def test_the_last_step_is_cut_to_the_tokens_returned():
    # max_tokens=6: the last step accepted 3 (would emit 4) but only 2 of them were returned
    stats = step_stats(list(range(6)), [2, 3], [3, 3], speculative=True)
    assert stats.accept_lengths == [1, 3, 2] and stats.new_tokens == 6
    assert stats.accepted_tokens == 2 + 2  # the cut step's returned tokens were all drafts


def test_counts_that_do_not_fit_the_tokens_are_unknown_not_guessed():
    for accepted, drafted in (([3, 3, 3], [3, 3, 3]), ([1], [3, 3]), (None, None)):
        stats = step_stats(list(range(5)), accepted, drafted, speculative=True)
        assert stats.new_tokens == 5 and stats.target_passes == 0 and stats.accept_lengths == []


def test_missing_environment_names_the_setup_script(monkeypatch, tmp_path):
    monkeypatch.delenv("VERISPEC_VLLM_PYTHON", raising=False)
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"scripts/setup_vllm\.sh"):
        vllm_python()
    monkeypatch.setenv("VERISPEC_VLLM_PYTHON", str(tmp_path / "nope" / "python"))
    with pytest.raises(RuntimeError, match="no vLLM environment at .*nope"):
        vllm_python()


@pytest.mark.real
def test_engine_settings_per_peer(fake_vllm, smol):
    ar = VLLMPeer("vllm-ar", smol)
    assert ar.engine["model"] == str(Path(smol.model.config._name_or_path))
    assert ar.engine["dtype"] == "float32" and ar.engine["generation_config"] == "vllm"
    assert "speculative_config" not in ar.engine and "per_request_spec_decode_metrics" not in ar.engine
    ngram = VLLMPeer("vllm-ngram", smol, num_speculative_tokens=5)
    assert ngram.engine["speculative_config"] == {"method": "ngram", "num_speculative_tokens": 5,
                                                  "prompt_lookup_max": 3, "prompt_lookup_min": 1}
    assert ngram.engine["per_request_spec_decode_metrics"] == "detailed"
    draft = VLLMPeer("vllm-draft-model", smol, draft=smol)
    assert draft.engine["speculative_config"]["method"] == "draft_model"


@pytest.mark.real
def test_head_peers_export_the_shipped_heads(fake_vllm, smol):
    eagle = VLLMPeer("vllm-eagle", smol)
    spec = eagle.engine["speculative_config"]
    assert spec["method"] == "eagle" and spec["num_speculative_tokens"] == 4  # the shipped head is EAGLE-1
    head = Path(spec["model"])
    assert sorted(p.name for p in head.iterdir()) == ["config.json", "model.safetensors"]
    medusa = VLLMPeer("vllm-medusa", smol)
    spec = medusa.engine["speculative_config"]
    config = json.loads((Path(spec["model"]) / "config.json").read_text())
    assert spec["method"] == "medusa" and spec["num_speculative_tokens"] == config["num_heads"] == 3
    assert config["truncated_vocab_size"] == config["vocab_size"]
    other = VLLMPeer("vllm-eagle", smol, head=str(SMOL_HEADS / "medusa"))  # head=DIR: any exportable head
    assert other.engine["speculative_config"]["method"] == "medusa"
    for peer in (eagle, medusa, other):
        peer.close()
        assert not Path(peer.engine["speculative_config"]["model"]).exists()  # its export is cleaned up


@pytest.mark.real
def test_bad_peer_settings(fake_vllm, smol):
    with pytest.raises(ValueError, match="needs a draft model: pass --draft"):
        VLLMPeer("vllm-draft-model", smol)
    with pytest.raises(ValueError, match="no option.*ngram_size.*num_speculative_tokens"):
        VLLMPeer("vllm-ngram", smol, ngram_size=3)
    with pytest.raises(ValueError, match="unknown vLLM peer"):
        VLLMPeer("vllm-lookahead", smol)


@pytest.mark.real
def test_bench_knows_the_vllm_peers(fake_vllm, smol):
    assert set(VLLM_PEERS) >= {"vllm-ar", "vllm-ngram", "vllm-eagle", "vllm-draft-model"}
    peer = runner.build_method("vllm-ngram@k5", smol, {"num_speculative_tokens": 5})
    assert isinstance(peer, VLLMPeer) and peer.name == "vllm-ngram" and peer.kind == "vllm"
    with pytest.raises(ValueError, match="vllm-ar"):  # the unknown-method error lists them
        runner.build_method("vllm-nope", smol, {})


@pytest.mark.real
def test_an_engine_that_does_not_start_fails_once_with_its_reason(monkeypatch, smol, tmp_path):
    """A stand-in worker that exits at once: the error says so, carries its last log lines,
    and later questions get the same error without another start."""
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'vllm: cannot allocate the KV cache' >&2\nexit 3\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VERISPEC_VLLM_PYTHON", str(fake))
    peer = VLLMPeer("vllm-ar", smol)
    with pytest.raises(RuntimeError, match=r"(?s)vllm-ar.*exited \(code 3\).*cannot allocate the KV cache"):
        peer.generate([1, 2, 3], 4)
    fake.write_text(f"#!/bin/sh\ntouch {tmp_path / 'started-again'}\nexit 3\n")
    with pytest.raises(RuntimeError, match="exited"):
        peer.generate([1, 2, 3], 4)
    assert not (tmp_path / "started-again").exists() and peer._proc is None


@pytest.mark.real
def test_a_bench_run_goes_on_past_a_peer_that_cannot_start(monkeypatch, smol, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no vllm here' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("VERISPEC_VLLM_PYTHON", str(fake))
    questions = tmp_path / "question.jsonl"
    questions.write_text("".join(json.dumps({"question_id": i, "category": "qa", "turns": [f"What is {i} + {i}?"]}) + "\n"
                                 for i in (1, 2)))
    config = runner.BenchConfig(out=tmp_path / "run", questions=str(questions), methods=["ar", "vllm-ar"],
                                max_new_tokens=4, warmup=0, traces=False)
    result = runner.run_bench(config, lm=smol, progress=False)
    assert [r["question_id"] for r in runner.read_answers(tmp_path / "run" / "ar.jsonl")] == [1, 2]
    assert not (tmp_path / "run" / "vllm-ar.jsonl").exists()
    failures = [json.loads(line) for line in (tmp_path / "run" / "failures.jsonl").read_text().splitlines()]
    assert [(f["question_id"], f["method"]) for f in failures] == [(1, "vllm-ar"), (2, "vllm-ar")]
    assert all("exited (code 1)" in f["error"] and "no vllm here" in f["error"] for f in failures)
    assert result.report is not None
