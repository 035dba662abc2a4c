"""vLLM itself, on the shipped smollm2 heads: exported by verispec, loaded and run by vLLM.

Marked `vllm` and left out of the default run (vLLM needs its own environment and ~45 s per
engine start). Run them with

    bash scripts/setup_vllm.sh && .venv/bin/python -m pytest -q -m vllm

(.ci/run does). Without the environment they skip with that command, unless
VERISPEC_REQUIRE_VLLM=1 (set by .ci/run), where a missing environment fails them.

Float32, so that "equals vLLM's own non-speculative output" is a property of vLLM's
speculative decoding and not of bf16 rounding (in bf16 a k-token verify pass rounds
differently from one-token decoding, in vLLM as in verispec; see issue 14).
"""
from __future__ import annotations

import json
import os

import pytest

from verispec.bench.layout import answer_path, read_answers
from verispec.bench.runner import BenchConfig, run_bench
from verispec.bench.vllm_peer import VLLMPeer, vllm_python

pytestmark = [pytest.mark.vllm, pytest.mark.real]

QUESTIONS = [
    {"question_id": 1, "category": "coding", "turns": ["Write a Python function that reverses a list."]},
    {"question_id": 2, "category": "summarization",
     "turns": ["Summarize: The cat sat on the mat. The dog sat on the rug. The cat and the dog are friends."]},
]
PEERS = ("vllm-ar", "vllm-ngram", "vllm-eagle", "vllm-medusa")
TOKENS = 40


@pytest.fixture(scope="module")
def environment():
    try:
        return vllm_python()
    except RuntimeError as e:
        if os.environ.get("VERISPEC_REQUIRE_VLLM") == "1":
            pytest.fail(str(e), pytrace=False)
        pytest.skip(f"{e}; then: .venv/bin/python -m pytest -q -m vllm")


@pytest.fixture(scope="module")
def bench(environment, smol, tmp_path_factory):
    """One bench run: verispec's ar beside vLLM with and without its speculative decoding."""
    tmp = tmp_path_factory.mktemp("vllm-bench")
    questions = tmp / "question.jsonl"
    questions.write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    eager = {"enforce_eager": True}  # torch.compile would take ~4 min per engine on 2 cores
    config = BenchConfig(out=tmp / "run", questions=str(questions), methods=["ar", *PEERS],
                         options={p: dict(eager) for p in PEERS}, max_new_tokens=TOKENS, warmup=0, traces=False)
    result = run_bench(config, lm=smol, progress=False)
    records = {m: read_answers(answer_path(config.out, m)) for m in ("ar", *PEERS)}
    return config.out, result, records


def test_every_vllm_peer_ran_every_question(bench):
    out, result, records = bench
    assert not (out / "failures.jsonl").exists(), (out / "failures.jsonl").read_text()
    for method in PEERS:
        assert [r["question_id"] for r in records[method]] == [1, 2], method
        engine = records[method][0]["verispec"]["engine"]
        assert engine["engine"] == "vllm" and engine["version"] and engine["startup_s"] > 0
        assert records[method][0]["verispec"]["kind"] == "vllm"


def test_speculative_vllm_equals_vllm_without_speculation(bench):
    _, _, records = bench
    plain = {r["question_id"]: r["verispec"]["token_ids"] for r in records["vllm-ar"]}
    assert all(len(ids[0]) > 0 for ids in plain.values())
    for method in ("vllm-ngram", "vllm-eagle", "vllm-medusa"):
        assert {r["question_id"]: r["verispec"]["token_ids"] for r in records[method]} == plain, method


def test_vllm_reports_acceptance_on_the_exported_heads(bench):
    _, _, records = bench
    for method in ("vllm-eagle", "vllm-medusa", "vllm-ngram"):
        accepted = sum(sum(r["verispec"]["accepted_tokens"]) for r in records[method])
        drafted = sum(sum(r["verispec"]["drafted_tokens"]) for r in records[method])
        steps = sum(sum(r["choices"][0]["decoding_steps"]) for r in records[method])
        tokens = sum(sum(r["choices"][0]["new_tokens"]) for r in records[method])
        assert drafted > 0 and accepted > 0, method
        assert tokens / steps > 1.0, method  # more than one token per target pass
    for method in ("vllm-eagle", "vllm-medusa"):  # the heads draft at every step
        for r in records[method]:
            assert r["verispec"]["drafted_tokens"][0] >= r["choices"][0]["decoding_steps"][0] - 1


def test_the_report_shows_the_vllm_peers(bench):
    out, result, _ = bench
    text = result.report.read_text()
    for method in PEERS:
        assert f"`{method}`" in text


def test_a_peer_that_cannot_start_says_why(environment, smol):
    peer = VLLMPeer("vllm-ar", smol, max_model_len=10 ** 9, enforce_eager=True, startup_timeout_s=300)
    with pytest.raises(RuntimeError, match="(?s)vllm-ar: vLLM did not start: .*max_model_len"):
        peer.generate([1, 2, 3], 4)


# ---------------------------------------------------------------- the README's "Scale out" commands

def test_readme_scale_out_commands(environment, bench, smol, tmp_path):
    """README, "Scale out": export the shipped head with the CLI, serve it with `vllm serve`
    exactly as written there (float32 here, as the bench above), ask over the OpenAI API; the
    answer is vLLM's plain-decoding answer and vLLM's /metrics counts accepted drafts."""
    import re
    import shlex
    import socket
    import subprocess
    import sys
    import time
    import urllib.request
    from pathlib import Path

    from openai import OpenAI

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = readme.split("## Scale out", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    commands = [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]
    export_cmd = next(c for c in commands if " export --to vllm " in c)
    serve_cmd = next(c for c in commands if "vllm.entrypoints.openai.api_server" in c)
    export_args = shlex.split(export_cmd.split("#")[0])
    out = tmp_path / "head"
    export_args[-1] = str(out)  # the README writes under the current directory
    printed = subprocess.run([sys.executable, "-m", "verispec.cli", *export_args[1:]], check=True, capture_output=True,
                             text=True, cwd=Path(__file__).parents[1]).stdout
    spec = json.loads(re.search(r"--speculative-config '(.*)'", printed).group(1))
    assert spec == {"method": "eagle", "model": str(out), "num_speculative_tokens": spec["num_speculative_tokens"]}

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = shlex.split(serve_cmd.split("#")[0])
    assert args[0].endswith("/vllm-env/bin/python") and args[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
    model = args.index("--model") + 1
    assert args[model].endswith("/models/smollm2-135m-instruct")
    args[0], args[model] = str(environment), smol.model.config._name_or_path  # wherever they are here
    args[args.index("--port") + 1] = str(port)
    args[args.index("--speculative-config") + 1] = json.dumps({**json.loads(args[args.index("--speculative-config") + 1]),
                                                               "model": str(out)})
    args += ["--dtype", "float32"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", VLLM_CPU_KVCACHE_SPACE="1", VLLM_NO_USAGE_STATS="1")
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "vllm.log", "w"), env=env)
    try:
        deadline = time.time() + 600
        while True:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert time.time() < deadline, "vllm serve did not come up in 600 s"
                time.sleep(2)
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none")
        model = client.models.list().data[0].id
        reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": QUESTIONS[0]["turns"][0]}],
                                               temperature=0, max_tokens=TOKENS, extra_body={"return_token_ids": True})
        _, _, records = bench
        plain = next(r for r in records["vllm-ar"] if r["question_id"] == 1)
        assert reply.choices[0].token_ids == plain["verispec"]["token_ids"][0][:len(reply.choices[0].token_ids)]
        assert len(reply.choices[0].token_ids) >= len(plain["verispec"]["token_ids"][0]) - 1  # (a stop token may be left out)
        metrics = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
        accepted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                       if line.startswith("vllm:spec_decode_num_accepted_tokens_total"))
        assert accepted > 0
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()


# ---------------------------------------------------------------- the other kinds verispec exports

def test_an_eagle3_head_and_a_draft_model_load_in_vllm_as_exported(environment, bench, smol, tmp_path_factory):
    """No EAGLE-3 head is shipped yet, so one of verispec's own (untrained: random weights, the
    default layer ids) and a draft model (4 of the target's layers, as `verispec train
    draft-model` starts from), each exported, loaded and run by vLLM: same tokens as vllm-ar."""
    import torch

    import verispec
    from verispec.draft_init import layer_subset
    from verispec.export import export
    from verispec.heads.eagle3 import Eagle3Head, head_config, save_eagle3
    from verispec.models import tokenizer_identity

    tmp_path = tmp_path_factory.mktemp("kinds")  # (not the test's own folder: its name holds "eagle3", see below)
    torch.manual_seed(0)
    head = Eagle3Head(head_config(smol.model.config, 8192))
    head.set_draft_vocab(torch.arange(8192))
    save_eagle3(head, tmp_path / "eagle3", tokenizer_identity(smol))
    subset = layer_subset(smol, [0, 1, 2, 3])
    subset.model.save_pretrained(tmp_path / "draft")
    smol.tokenizer.save_pretrained(tmp_path / "draft")
    export(tmp_path / "draft", tmp_path / "draft-vllm")
    draft = verispec.load_model(str(tmp_path / "draft-vllm"), dtype="float32")

    from verispec.chat import ChatFormatter

    _, _, records = bench
    plain = next(r for r in records["vllm-ar"] if r["question_id"] == 1)["verispec"]["token_ids"][0]
    prompt = ChatFormatter(smol).encode([{"role": "user", "content": QUESTIONS[0]["turns"][0]}])  # as the bench's
    for name, peer in (("eagle3", VLLMPeer("vllm-eagle", smol, head=str(tmp_path / "eagle3"), enforce_eager=True)),
                       ("draft-model", VLLMPeer("vllm-draft-model", smol, draft=draft, enforce_eager=True))):
        try:
            assert peer.engine["speculative_config"]["method"] == {"eagle3": "eagle3", "draft-model": "draft_model"}[name]
            out = peer.generate(prompt, TOKENS)
            assert out.token_ids == plain, name
            assert out.stats.drafted_tokens > 0, name  # it drafted (an untrained head's drafts are mostly rejected)
        finally:
            peer.close()
