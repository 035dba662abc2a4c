"""`verispec export --to vllm`: every drafter kind leaves a directory vLLM loads as it is.

The expected tensor names and config fields below are written from vLLM's loaders, not from
verispec's savers (each set names the vLLM file it comes from); the exported EAGLE heads,
Medusa heads and draft models still load in verispec and draft exactly as their sources.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from verispec import SpeculativeGenerator, cli
from verispec.assets import DRAFTERS
from verispec.draft_init import layer_subset
from verispec.export import export, export_for_vllm
from verispec.heads.eagle import EagleHead, head_config as eagle1_config, load_eagle, save_eagle
from verispec.heads.eagle3 import Eagle3Head, head_config as eagle3_config, load_eagle3, save_eagle3
from verispec.heads.medusa import MedusaHeads, load_medusa, save_medusa
from verispec.models import tokenizer_identity
from conftest import tiny_llama
from test_eagle3 import eagle3_tensor_shapes

LAYERS = [0, 1, 2]
PROMPTS = ([5, 6, 7, 8], [1, 90, 33, 2, 2, 14, 60])
# what the trainers leave beside the weights (trainer.py, common.py, distill.py): never exported
TRAINING_LEFTOVERS = {"training.json": "{}", "loss.png": "png", "heldout.png": "png", "trainer-state.pt": "pt"}

# vLLM's registry (vllm/model_executor/models/registry.py, _SPECULATIVE_DECODING_MODELS) maps these
# architectures to the loaders below; EAGLEConfig (vllm/transformers_utils/configs/eagle.py) keeps an
# architecture starting with "Eagle" (method eagle) or ending with "Eagle3" (method eagle3) as it is.
VLLM_ARCHITECTURES = {"eagle1": "EagleLlamaForCausalLM", "eagle3": "LlamaForCausalLMEagle3", "medusa": "MedusaModel"}


# ---------------------------------------------------------------- what vLLM loads, from its source

def llama_layer(prefix: str, input_norm: bool = True) -> set[str]:
    """A Llama decoder layer's checkpoint names, as LlamaModel.load_weights maps them
    (vllm/model_executor/models/llama.py: q/k/v -> qkv_proj, gate/up -> gate_up_proj)."""
    names = {prefix + f"self_attn.{p}_proj.weight" for p in "qkvo"} | {prefix + "post_attention_layernorm.weight"}
    names |= {prefix + f"mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    return names | ({prefix + "input_layernorm.weight"} if input_norm else set())


def vllm_eagle1_names(layers: int = 1) -> set[str]:
    """vllm/model_executor/models/llama_eagle.py: EagleLlamaForCausalLM.load_weights prefixes every
    name with "model."; LlamaModel has `fc` (Linear(2H, H), no bias) and `layers`, layer 0's
    input_layernorm an Identity (no parameter); no lm_head, embed_tokens skipped (shared)."""
    names = {"fc.weight"}
    for i in range(layers):
        names |= llama_layer(f"layers.{i}.", input_norm=i > 0)
    return names


def vllm_eagle3_names() -> set[str]:
    """vllm/model_executor/models/llama_eagle3.py: Eagle3LlamaForCausalLM.load_weights skips t2d,
    renames d2t -> draft_id_to_target_id, keeps lm_head.*, prefixes the rest with "model.";
    LlamaModel.load_weights renames midlayer. -> layers.0.; the layer has input_layernorm and
    hidden_norm; the model has fc (3*target_hidden -> H) and norm. d2t is what makes a reduced
    draft vocabulary exact (without it draft id i would be read as target id i)."""
    names = {"fc.weight", "norm.weight", "lm_head.weight", "midlayer.hidden_norm.weight"} | llama_layer("midlayer.")
    return names | {"d2t", "t2d"}


def vllm_medusa_names(heads: int, layers: int, truncated: bool, shared: bool) -> set[str]:
    """vllm/model_executor/models/medusa.py: Medusa.load_weights: blocks.<h>.layers.<l>.{weight,bias}
    (bias with medusa_fc_bias), lm_heads.<h>.weight (lm_heads.0.weight -> lm_head with
    original_lm_head), token_map when truncated_vocab_size < vocab_size."""
    names = {f"blocks.{h}.layers.{l}.{p}" for h in range(heads) for l in range(layers) for p in ("weight", "bias")}
    names |= {f"lm_heads.{h}.weight" for h in range(1 if shared else heads)}
    return names | ({"token_map"} if truncated else set())


def vllm_llama_names(layers: int, tied: bool) -> set[str]:
    """vllm/model_executor/models/llama.py: LlamaForCausalLM.load_weights (lm_head. skipped when
    tie_word_embeddings), LlamaModel: embed_tokens, layers, norm."""
    names = {"model.embed_tokens.weight", "model.norm.weight"}
    for i in range(layers):
        names |= llama_layer(f"model.layers.{i}.")
    return names | (set() if tied else {"lm_head.weight"})


def tensor_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(path), framework="pt") as f:
        return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}


def files(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir())


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def check_rope(config: dict) -> None:
    """rope_theta beside rope_parameters: vLLM on transformers 4 reads rope_theta
    (vllm/transformers_utils/config.py, patch_rope_parameters), on 5 rope_parameters."""
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"]
    assert LlamaConfig(**config).rope_parameters["rope_theta"] == config["rope_theta"]


def aux_layers_as_vllm_reads_them(config: dict):
    """vllm/v1/worker/gpu_model_runner.py, _get_eagle3_aux_layers_from_config: a top-level
    eagle_aux_hidden_state_layer_ids of the draft's hf_config, else the target's defaults."""
    ids = getattr(LlamaConfig(**config), "eagle_aux_hidden_state_layer_ids", None)
    return tuple(ids) if ids else None


def with_leftovers(path: Path) -> Path:
    for name, text in TRAINING_LEFTOVERS.items():
        (path / name).write_text(text)
    return path


def drafts(lm, drafter: Path, **options) -> list:
    """Every tree the eagle drafter proposes over PROMPTS, and the outputs."""
    gen = SpeculativeGenerator(lm, "eagle", drafter=str(drafter), tree="dynamic", depth=3, top_k=2, budget=6, **options)
    seen = []
    original = gen.drafter.propose
    gen.drafter.propose = lambda ctx: seen.append(t := original(ctx)) or t
    outs = [gen.generate(p, max_new_tokens=24).token_ids for p in PROMPTS]
    assert sum(t.num_drafted for t in seen) > 0
    return [(t.tokens, t.parents) for t in seen], outs


# ---------------------------------------------------------------- tiny drafters

@pytest.fixture(scope="module")
def target3():
    return tiny_llama(layers=3)


def eagle3_dir(lm, path: Path, draft_vocab: int | None = 48) -> Path:
    torch.manual_seed(0)
    V = lm.model.config.vocab_size
    head = Eagle3Head(eagle3_config(lm.model.config, draft_vocab or V, LAYERS))
    with torch.no_grad():
        head.lm_head.weight.mul_(8.0)
    head.set_draft_vocab(torch.arange(0, V, V // draft_vocab)[:draft_vocab] if draft_vocab else torch.arange(V))
    return with_leftovers(save_eagle3(head, path, tokenizer_identity(lm)))


def eagle1_dir(lm, path: Path) -> Path:
    torch.manual_seed(0)
    head = EagleHead(eagle1_config(lm.model.config))
    ranking = torch.randperm(lm.model.config.vocab_size, generator=torch.Generator().manual_seed(1))
    return with_leftovers(save_eagle(head, path, tokenizer_identity(lm), token_ranking=ranking))


def medusa_dir(lm, path: Path, draft_vocab: int | None = 20, shared: bool = False) -> Path:
    config = lm.model.config
    token_map = None if draft_vocab is None else torch.randperm(config.vocab_size)[:draft_vocab]
    heads = MedusaHeads(config.hidden_size, config.vocab_size, 3, 2, token_map=token_map,
                        shared_lm_head=shared).init_from_target(lm.model.lm_head.weight)
    heads.meta = {"vocab_hash": tokenizer_identity(lm)["vocab_hash"]}
    return with_leftovers(save_medusa(heads, path, target_name="tiny"))


def draft_model_dir(path: Path, tied: bool = False, shard: str | None = None) -> tuple[Path, torch.nn.Module]:
    if tied:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                             bos_token_id=None, eos_token_id=None, pad_token_id=None)
        model = LlamaForCausalLM(config).eval()
    else:
        model = layer_subset(tiny_llama(layers=3), [0, 2]).model  # what `verispec train draft-model` starts from
    model.save_pretrained(path, **({"max_shard_size": shard} if shard else {}))
    with_leftovers(path)
    (path / "verispec-draft.json").write_text("{}")  # distill.py's record
    (path / "README.md").write_text("# draft\n")
    return path, model


# ---------------------------------------------------------------- EAGLE-3

def test_eagle3_export_is_vllms_layout_and_drafts_the_same(target3, tmp_path):
    src = eagle3_dir(target3, tmp_path / "src")
    out = export_for_vllm(src, tmp_path / "out")
    assert files(out) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [VLLM_ARCHITECTURES["eagle3"]]
    assert (config["draft_vocab_size"], config["vocab_size"], config["target_hidden_size"]) == (48, 96, 64)
    assert config["num_hidden_layers"] == 1 and config["eagle_config"]["use_aux_hidden_state"] is True
    assert config["norm_before_residual"] is False  # the residual is the un-normalised fused hidden
    assert aux_layers_as_vllm_reads_them(config) == tuple(LAYERS)
    # the trainer writes them where vLLM looks too (heads/eagle3.head_config), so the source loads as well
    assert aux_layers_as_vllm_reads_them(json.loads((src / "config.json").read_text())) == tuple(LAYERS)
    check_rope(config)
    assert tensor_shapes(out / "model.safetensors") == eagle3_tensor_shapes(H=64, I=128, kv=2 * 16, draft=48, V=96)
    assert set(tensor_shapes(out / "model.safetensors")) == vllm_eagle3_names()
    assert digest(out / "model.safetensors") == digest(src / "model.safetensors")
    # round trip: verispec reads the export and drafts exactly as from the source
    a, b = load_eagle3(src, target3), load_eagle3(out, target3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert drafts(target3, src) == drafts(target3, out)


def test_eagle3_full_vocabulary_head(target3, tmp_path):
    src = eagle3_dir(target3, tmp_path / "src", draft_vocab=None)
    out = export_for_vllm(src, tmp_path / "out")
    config = json.loads((out / "config.json").read_text())
    assert config["draft_vocab_size"] == config["vocab_size"] == 96
    assert set(tensor_shapes(out / "model.safetensors")) == vllm_eagle3_names()


# ---------------------------------------------------------------- EAGLE-1

def test_eagle1_export_drops_the_draft_vocabulary_file(tiny, tmp_path):
    src = eagle1_dir(tiny, tmp_path / "src")
    assert (src / "draft_vocab.safetensors").exists()
    result = export(src, tmp_path / "out")
    out = result.out
    # vLLM loads every *.safetensors of the directory: only model.safetensors may be there
    assert files(out) == ["config.json", "model.safetensors"]
    assert set(result.dropped) == {"draft_vocab.safetensors", *TRAINING_LEFTOVERS}
    assert any("draft_vocab.safetensors" in n for n in result.notes)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [VLLM_ARCHITECTURES["eagle1"]] and config["model_type"] == "llama"
    assert config["num_hidden_layers"] == 1
    # vLLM's EAGLE-1 drafts over the target's whole vocabulary (LogitsProcessor(config.vocab_size))
    assert config["draft_vocab_size"] == config["vocab_size"] == 96
    check_rope(config)
    assert set(tensor_shapes(out / "model.safetensors")) == vllm_eagle1_names()
    assert tensor_shapes(out / "model.safetensors")["fc.weight"] == (64, 128)
    # round trip: the same head, drafting over the full vocabulary (verispec's draft_vocab=0)
    a, b = load_eagle(src, tiny.model).state_dict(), load_eagle(out, tiny.model).state_dict()
    unused = "model.embed_tokens.weight"  # the inner model's placeholder table (vocab 1), never loaded nor read
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a if k != unused)
    assert drafts(tiny, src, draft_vocab=0) == drafts(tiny, out, draft_vocab=0)
    with pytest.raises(ValueError, match="no draft vocabulary ranking"):
        load_eagle(out, tiny.model, draft_vocab=20)  # what was dropped, stated plainly


# ---------------------------------------------------------------- Medusa

@pytest.mark.parametrize("draft_vocab,shared", [(20, False), (None, False), (20, True)])
def test_medusa_export_loads_as_vllm_reads_it(tiny, tmp_path, draft_vocab, shared):
    src = medusa_dir(tiny, tmp_path / "src", draft_vocab, shared)
    out = export_for_vllm(src, tmp_path / "out")
    assert files(out) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    # vllm/transformers_utils/configs/medusa.py (MedusaConfig) and medusa.py read these
    assert config["architectures"] == [VLLM_ARCHITECTURES["medusa"]] and config["model_type"] == "medusa"
    assert (config["hidden_size"], config["vocab_size"], config["num_heads"], config["num_hidden_layers"]) == (64, 96, 3, 2)
    # vLLM 0.32 loads no truncated Medusa: every head is written over the whole vocabulary
    assert config["truncated_vocab_size"] == 96
    assert config["medusa_fc_bias"] is True and config["original_lm_head"] is shared
    shapes = tensor_shapes(out / "model.safetensors")
    assert set(shapes) == vllm_medusa_names(3, 2, False, shared)
    assert all(shapes[n] == (96, 64) for n in shapes if n.startswith("lm_heads."))
    a, b = load_medusa(src), load_medusa(out)
    assert all(torch.equal(x, y) for x, y in zip(a.blocks.state_dict().values(), b.blocks.state_dict().values()))
    if draft_vocab is None:
        assert digest(out / "model.safetensors") == digest(src / "model.safetensors")
        return
    # what vLLM drafts (each head's argmax over the full rows) is what the truncated heads draft
    # (argmax over the map, mapped back), except where that is the filler token itself
    token_map = a.token_map
    filler = int(token_map.max())
    hidden = torch.randn(2000, 64)
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        full = {n: f.get_tensor(n).float() for n in f.keys() if n.startswith("lm_heads.")}
    with safe_open(str(src / "model.safetensors"), framework="pt") as f:
        rows = {n: f.get_tensor(n).float() for n in f.keys() if n.startswith("lm_heads.")}
    for name in rows:
        assert torch.equal(full[name][token_map], rows[name])
        truncated = token_map[(hidden @ rows[name].T).argmax(-1)]
        drafted = (hidden @ full[name].T).argmax(-1)
        assert torch.equal(drafted[truncated != filler], truncated[truncated != filler])
        assert (truncated != filler).float().mean() > 0.8


# ---------------------------------------------------------------- draft models

@pytest.mark.parametrize("tied,shard", [(False, None), (True, None), (False, "60KB")])
def test_draft_model_export(tmp_path, tied, shard):
    src, model = draft_model_dir(tmp_path / "src", tied=tied, shard=shard)
    if shard:
        assert len(list(src.glob("*.safetensors"))) > 1 and (src / "model.safetensors.index.json").exists()
    result = export(src, tmp_path / "out")
    out = result.out
    assert result.kind == "draft-model"
    expected = ["config.json", "model.safetensors"] + (["generation_config.json"] if (src / "generation_config.json").exists() else [])
    assert files(out) == sorted(expected)
    assert {"verispec-draft.json", "README.md", *TRAINING_LEFTOVERS} <= set(result.dropped)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_hidden_layers"] == 2
    check_rope(config)
    assert set(tensor_shapes(out / "model.safetensors")) == vllm_llama_names(2, tied)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.tensor([[3, 1, 4, 1, 5, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    assert result.speculative_config["method"] == "draft_model"


# ---------------------------------------------------------------- the shipped heads

SHIPPED = sorted(p for p in (DRAFTERS / "smollm2-135m-instruct").iterdir() if (p / "config.json").exists())


@pytest.mark.parametrize("src", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_heads_export(src, tmp_path):
    """Without the real model: files, config fields and tensor names, weights byte for byte."""
    before = {p.name: digest(p) for p in src.iterdir()}
    result = export(src, tmp_path / "out")
    out = result.out
    assert {p.name: digest(p) for p in src.iterdir()} == before  # the package data is untouched
    assert files(out) == ["config.json", "model.safetensors"]
    config = json.loads((out / "config.json").read_text())
    if result.kind != "medusa":  # (Medusa's truncated heads are widened, tested above)
        assert digest(out / "model.safetensors") == digest(src / "model.safetensors")
    names = set(tensor_shapes(out / "model.safetensors"))
    assert config["architectures"] == [VLLM_ARCHITECTURES[result.kind]]
    if result.kind == "eagle1":
        assert names == vllm_eagle1_names(config["num_hidden_layers"])
        assert config["draft_vocab_size"] == config["vocab_size"] == 49152 and config["hidden_size"] == 576
        check_rope(config)
        assert config["rope_theta"] == 100000.0  # SmolLM2's, not LlamaConfig's default 10000
    elif result.kind == "eagle3":
        assert names == vllm_eagle3_names()
        assert aux_layers_as_vllm_reads_them(config) == tuple(config["eagle_config"]["eagle_aux_hidden_state_layer_ids"])
        check_rope(config)
    else:
        assert result.kind == "medusa"
        source = json.loads((src / "config.json").read_text())
        assert config == {**source, "truncated_vocab_size": source["vocab_size"]}
        assert names == vllm_medusa_names(config["num_heads"], config["num_hidden_layers"], False,
                                          config["original_lm_head"])


# ---------------------------------------------------------------- errors and the command line

def test_existing_out_is_refused_unless_forced(tiny, tmp_path):
    src = medusa_dir(tiny, tmp_path / "src")
    out = tmp_path / "out"
    out.mkdir()
    export_for_vllm(src, out)  # an empty OUT is fine
    (out / "stale.safetensors").write_text("x")
    with pytest.raises(ValueError, match="--force"):
        export_for_vllm(src, out)
    assert (out / "stale.safetensors").exists()
    export_for_vllm(src, out, force=True)
    assert files(out) == ["config.json", "model.safetensors"]  # nothing left from before
    for bad in (src, tmp_path):  # SRC itself, or a folder holding it: never replaced
        with pytest.raises(ValueError, match="SRC"):
            export_for_vllm(src, bad, force=True)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("x")
    with pytest.raises(ValueError, match="not an earlier export"):  # --force replaces exports, not any folder
        export_for_vllm(src, tmp_path / "notes", force=True)
    assert (tmp_path / "notes" / "mine.txt").exists()
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="not a directory"):
        export_for_vllm(src, tmp_path / "file", force=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written leftovers


def test_unknown_source_is_one_clear_error(tmp_path):
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (tmp_path / "empty").mkdir()
    for src in (tmp_path / "bert", tmp_path / "empty", tmp_path / "missing"):
        with pytest.raises(ValueError) as err:
            export_for_vllm(src, tmp_path / "out")
        message = str(err.value)
        assert str(src) in message and "EAGLE-3" in message and "EAGLE-1" in message and "Medusa" in message \
            and "draft model" in message
    assert not (tmp_path / "out").exists()


def test_command_line(tiny, tmp_path, capsys):
    src = eagle1_dir(tiny, tmp_path / "src")
    assert cli.main(["export", "--to", "vllm", str(src), str(tmp_path / "out")]) == 0
    printed = capsys.readouterr().out
    assert "draft_vocab.safetensors" in printed and '"method": "eagle"' in printed
    assert files(tmp_path / "out") == ["config.json", "model.safetensors"]
    assert cli.main(["export", "--to", "vllm", str(src), str(tmp_path / "out")]) == 2
    assert "--force" in capsys.readouterr().err
    assert cli.main(["export", "--to", "vllm", "--force", str(src), str(tmp_path / "out")]) == 0
    with pytest.raises(SystemExit):
        cli.main(["export", "--to", "sglang", str(src), str(tmp_path / "other")])
    assert "only 'vllm'" in capsys.readouterr().err


def test_weights_vllm_cannot_map_are_refused(tiny, tmp_path):
    """A tensor vLLM has no parameter for fails its load (EAGLE-1's LlamaModel.load_weights looks
    every name up): the export refuses it rather than writing a directory vLLM chokes on."""
    from safetensors.torch import load_file, save_file

    src = eagle1_dir(tiny, tmp_path / "src")
    state = load_file(str(src / "model.safetensors"))
    save_file({**state, "token_ids": torch.arange(96)}, str(src / "model.safetensors"))  # the ranking folded in
    with pytest.raises(ValueError, match=r"unexpected \['token_ids'\]"):
        export_for_vllm(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_out_path_vllm_would_misread_is_refused(tiny, target3, tmp_path):
    """vLLM re-labels a drafter whose path holds "eagle3" (or "eagle-") as EAGLE, whatever the
    method: a Medusa head or a draft model exported there would not load."""
    src = medusa_dir(tiny, tmp_path / "src")
    with pytest.raises(ValueError, match="contains 'eagle3'.*'medusa'"):
        export_for_vllm(src, tmp_path / "my-eagle3-heads" / "out")
    assert not (tmp_path / "my-eagle3-heads" / "out").exists()
    eagle = eagle3_dir(target3, tmp_path / "e3")
    export_for_vllm(eagle, tmp_path / "smollm2-eagle3-vllm")  # an EAGLE head may say so
