"""`verispec export --to vllm SRC OUT`: a trained drafter as a directory vLLM loads as it is.

SRC is what `verispec train ...` wrote (or a shipped head under verispec/assets/drafters):
an EAGLE-3 head, an EAGLE-1 head, Medusa heads or a distilled draft model. OUT gets only
what vLLM reads: config.json and the weights in one model.safetensors (plus, for a draft
model, its tokenizer and generation config, which vLLM can read and never mistakes for
weights). Training reports (training.json), plots (*.png), trainer checkpoints
(trainer-state.pt), READMEs and verispec's own side files are not copied: vLLM reads none
of them, and its weight loader takes every *.safetensors file of the directory, so an extra
one breaks the load (the EAGLE-1 head's draft_vocab.safetensors did: "There is no module or
parameter named 'token_ids'").

What vLLM reads, per kind (from vLLM's source; the tests write the same name sets):

- EAGLE-3 (vllm/model_executor/models/llama_eagle3.py, Eagle3LlamaForCausalLM; registry name
  "LlamaForCausalLMEagle3"): config architectures, a one-layer Llama config (hidden_size,
  intermediate_size, num_attention_heads, num_key_value_heads, head_dim, rms_norm_eps, rope,
  vocab_size, attention_bias, mlp_bias), draft_vocab_size, target_hidden_size,
  eagle_config.use_aux_hidden_state, norm_before_residual (false: the layer's residual is
  the un-normalised fused hidden, as in verispec). Weights fc.weight, norm.weight,
  lm_head.weight [draft_vocab, hidden], midlayer.* (renamed layers.0.*; q/k/v read
  2*hidden), d2t (renamed draft_id_to_target_id: the draft vocabulary is expressed
  exactly), t2d (skipped). The target layers whose states the head reads are taken by
  vLLM's model runner (vllm/v1/worker/gpu_model_runner.py,
  _get_eagle3_aux_layers_from_config) from a *top-level* eagle_aux_hidden_state_layer_ids;
  heads saved before heads/eagle3.head_config wrote that field kept them only inside
  eagle_config, where that code does not look (it would fall back to the target's default
  layers (2, L/2, L-3)), so the export writes the top-level field whatever the source has.
- EAGLE-1 (vllm/model_executor/models/llama_eagle.py, EagleLlamaForCausalLM): the same Llama
  fields; weights fc.weight [hidden, 2*hidden] and layers.<i>.* of Llama decoder layers
  (layer 0 without input_layernorm); no lm_head and no embeddings (the target's are
  shared). vLLM's EAGLE-1 has no draft vocabulary at all: it drafts over the target's whole
  vocabulary with the target's LM head (LogitsProcessor(config.vocab_size)). verispec's
  reduced draft vocabulary (draft_vocab.safetensors, a token ranking that the `eagle` drafter
  applies at load time, draft_vocab=8192 by default) therefore cannot be expressed, and
  folding it into model.safetensors would break the load (vLLM maps every tensor name to a
  parameter), so it is dropped: the exported head is the same head drafting over the full
  vocabulary, what verispec does with draft_vocab=0. Drafts differ only where the best
  token lies outside the ranking; verification stays exact either way. config.json states
  draft_vocab_size = vocab_size.
- Medusa (vllm/model_executor/models/medusa.py, Medusa; vllm/transformers_utils/configs/medusa.py,
  MedusaConfig): verispec's trainer writes these names (blocks.<h>.layers.<l>.{weight,bias},
  lm_heads.<h>.weight, token_map when truncated_vocab_size < vocab_size, see heads/medusa.py),
  and heads over the whole vocabulary are copied unchanged. A truncated draft vocabulary does
  not load in vLLM 0.32 (checked by starting it): Medusa.load_weights slices each lm_head to
  token_map and then the vocabulary-parallel loader asserts the *full* vocabulary size. So
  truncated heads are written over the whole vocabulary with truncated_vocab_size =
  vocab_size and no token_map; the rows of tokens outside the map copy one mapped row, which
  keeps each head's argmax (see _full_vocab_medusa for the one exception).
- Draft model (vllm/model_executor/models/llama.py and qwen2.py, the *ForCausalLM the config
  names): a plain Hugging Face model; weights merged into one model.safetensors (vLLM reads
  shards too, but one file is what it is sure to take whole); names checked for Llama and
  Qwen2 (model.embed_tokens, model.layers.<i>.*, model.norm, lm_head unless tied).

Configs of EAGLE heads and draft models also get `rope_theta` beside `rope_parameters`
(transformers 5 writes only the latter; vLLM on transformers 4 reads rope_theta, whose
LlamaConfig default of 10000 would otherwise replace the trained value,
vllm/transformers_utils/config.py patch_rope_parameters) and `torch_dtype` where missing.

vLLM picks the method from the name of the directory only for some names, so the
command prints the --speculative-config to pass (method, model, num_speculative_tokens).
The other way round, vLLM 0.32 re-labels any drafter whose path contains "eagle3" or
"eagle-" (or "dflash", "dspark") as that method, whatever the config names: a Medusa head or
a draft model exported to such a path would be loaded as EAGLE and fail, so that OUT is refused.

OUT is written beside itself and renamed into place once complete. An existing OUT must be
empty, or, with --force, an earlier export (it holds a config.json): --force never empties
an arbitrary folder, nor SRC or a folder holding it.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .heads import eagle as eagle1_head
from .heads import eagle3 as eagle3_head
from .heads import medusa as medusa_head

TARGETS = ("vllm",)
CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
# files of a draft model beside its weights that vLLM can read (tokenizer, generation defaults)
DRAFT_MODEL_EXTRAS = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                      "vocab.json", "merges.txt", "added_tokens.json", "tokenizer.model", "chat_template.jinja",
                      "chat_template.json")
KINDS = {
    "eagle3": f"an EAGLE-3 head (architectures [{eagle3_head.ARCHITECTURE!r}])",
    "eagle1": f"an EAGLE-1 head (architectures [{eagle1_head.ARCHITECTURE!r}])",
    "medusa": "Medusa heads (model_type 'medusa')",
    "draft-model": "a draft model (a Hugging Face *ForCausalLM directory with safetensors weights)",
}
VLLM_METHOD = {"eagle3": "eagle3", "eagle1": "eagle", "medusa": "medusa", "draft-model": "draft_model"}


@dataclass
class Exported:
    kind: str  # one of KINDS
    out: Path
    files: list[str]  # what OUT holds
    dropped: list[str]  # files of SRC not exported
    notes: list[str] = field(default_factory=list)  # what changed and why
    speculative_config: dict[str, Any] = field(default_factory=dict)  # vLLM's --speculative-config
    merged: list[str] = field(default_factory=list)  # weight files of SRC merged into OUT's model.safetensors


def export_for_vllm(src: str | Path, out: str | Path, force: bool = False) -> Path:
    """Write the drafter in SRC to OUT in the layout vLLM loads (see the module docstring); returns OUT."""
    return export(src, out, force=force).out


def export(src: str | Path, out: str | Path, force: bool = False, to: str = "vllm") -> Exported:
    """export_for_vllm with the details: what was written, dropped and changed."""
    if to != "vllm":
        raise ValueError(f"cannot export to {to!r}: only 'vllm' is supported for now")
    src, out = Path(src), Path(os.path.abspath(out))  # (abspath: OUT "." still has a name and a parent)
    kind = detect_kind(src)
    conflict = vllm_path_conflict(out, VLLM_METHOD[kind])
    if conflict:
        raise ValueError(conflict)
    _check_out(src, out, force)
    config = json.loads((src / CONFIG).read_text())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.export-{uuid.uuid4().hex[:8]}"  # renamed to OUT once complete
    tmp.mkdir()  # (not tempfile.mkdtemp: its mode 0700 would stay OUT's)
    try:
        result = _WRITERS[kind](src, tmp, config)
        result.dropped = sorted(p.name for p in src.iterdir() if p.name not in result.files + result.merged)
        if out.exists():
            shutil.rmtree(out)  # empty, or --force (checked above)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    result.out = out
    result.speculative_config = {"method": VLLM_METHOD[kind], "model": str(out), **result.speculative_config}
    return result


# ---------------------------------------------------------------- source and destination

def detect_kind(src: Path) -> str:
    """eagle3, eagle1, medusa or draft-model, from SRC's config.json; one ValueError otherwise."""
    path = src / CONFIG
    if not src.is_dir() or not path.is_file():
        raise _unknown(src, "it has no config.json" if src.is_dir() else
                       "it is not a directory" if src.exists() else "it does not exist")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise _unknown(src, f"its config.json does not parse ({err})") from None
    archs = config.get("architectures") or []
    if not isinstance(archs, list):
        raise _unknown(src, f"its config.json has architectures {archs!r}")
    if eagle3_head.ARCHITECTURE in archs:
        kind = "eagle3"
    elif eagle1_head.ARCHITECTURE in archs:
        kind = "eagle1"
    elif config.get("model_type") == "medusa" or medusa_head.ARCHITECTURE in archs:
        kind = "medusa"
    elif (len(archs) == 1 and isinstance(archs[0], str) and archs[0].endswith("ForCausalLM")
          and "Eagle" not in archs[0] and config.get("model_type") not in (None, "eagle", "speculators")):
        kind = "draft-model"
    else:
        raise _unknown(src, f"its config.json declares architectures {archs} and model_type "
                            f"{config.get('model_type')!r}")
    if kind != "draft-model" and not (src / WEIGHTS).is_file():
        raise ValueError(f"{src} looks like {KINDS[kind]} but has no {WEIGHTS}")
    if kind == "draft-model" and not list(src.glob("*.safetensors")):
        raise ValueError(f"{src} looks like {KINDS[kind]} but has no *.safetensors weights "
                         "(save it with save_pretrained(..., safe_serialization=True))")
    return kind


def _unknown(src: Path, why: str) -> ValueError:
    return ValueError(f"{src} is not a drafter verispec can export ({why}); expected the output of "
                      f"'verispec train ...': " + ", ".join(KINDS.values()))


# vLLM 0.32 (config/speculative.py) re-labels a drafter whose path (any part of it, lower-cased)
# holds one of these as that method, whatever method the config names: a Medusa head or a draft
# model under such a path is then loaded as an EAGLE head and fails
_PATH_METHODS = (("eagle-", "eagle"), ("eagle3", "eagle3"), ("dflash", "dflash"), ("dspark", "dspark"))


def vllm_path_conflict(path: str | Path, method: str) -> str | None:
    """Why vLLM would load the drafter at `path` as another method than `method`, or None."""
    lowered = str(path).lower()
    for needle, detected in _PATH_METHODS:
        if needle in lowered and detected != method and method not in ("eagle", "eagle3"):
            return (f"vLLM takes a drafter whose path contains {needle!r} for {detected!r}, whatever the "
                    f"--speculative-config method ({method!r}) says: use a path without it ({path})")
    return None


def _check_out(src: Path, out: Path, force: bool) -> None:
    s, o = src.resolve(), out.resolve()
    if o == s or o in s.parents:
        raise ValueError(f"OUT {out} is SRC or holds it; choose another OUT")
    if out.exists() and not out.is_dir():
        raise ValueError(f"OUT {out} exists and is not a directory; choose another OUT")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ValueError(f"OUT {out} exists and is not empty; pass --force (force=True) to replace it, "
                             "or choose another OUT")
        if not (out / CONFIG).is_file():  # --force replaces an earlier export, not any folder
            raise ValueError(f"OUT {out} is not empty and holds no config.json (not an earlier export); even "
                             "with --force it is not replaced: choose another OUT or empty it yourself")


# ---------------------------------------------------------------- tensor names vLLM maps

def _llama_layer_names(prefix: str, config: dict, input_norm: bool = True, qkv_bias: bool = False) -> set[str]:
    names = {f"{prefix}self_attn.{p}_proj.weight" for p in "qkvo"} | {f"{prefix}post_attention_layernorm.weight"}
    names |= {f"{prefix}mlp.{p}_proj.weight" for p in ("gate", "up", "down")}
    if input_norm:
        names.add(f"{prefix}input_layernorm.weight")
    if config.get("attention_bias"):
        names |= {f"{prefix}self_attn.{p}_proj.bias" for p in "qkvo"}
    elif qkv_bias:
        names |= {f"{prefix}self_attn.{p}_proj.bias" for p in "qkv"}
    if config.get("mlp_bias"):
        names |= {f"{prefix}mlp.{p}_proj.bias" for p in ("gate", "up", "down")}
    return names


def vllm_names(kind: str, config: dict) -> tuple[set[str], set[str]] | None:
    """(required, optional) tensor names vLLM's loader maps for this kind and config, or None
    where the architecture's names are not checked here."""
    if kind == "eagle1":  # llama_eagle.py: fc + Llama layers, layer 0 without input_layernorm
        names = {"fc.weight"}
        for i in range(int(config["num_hidden_layers"])):
            names |= _llama_layer_names(f"layers.{i}.", config, input_norm=i > 0)
        return names, set()
    if kind == "eagle3":  # llama_eagle3.py: midlayer.* -> layers.0.*, d2t -> draft_id_to_target_id, t2d skipped
        names = {"norm.weight", "lm_head.weight"} | _llama_layer_names("midlayer.", config)
        names.add("midlayer.hidden_norm.weight")
        if (config.get("eagle_config") or {}).get("use_aux_hidden_state", True):
            names.add("fc.weight")
        optional = {"d2t", "t2d"}
        if int(config.get("draft_vocab_size") or config["vocab_size"]) < int(config["vocab_size"]):
            names.add("d2t")  # without it vLLM would read draft id i as target id i
        return names, optional - names
    if kind == "medusa":  # medusa.py: blocks, lm_heads (one when original_lm_head), token_map when truncated
        heads, layers = int(config["num_heads"]), int(config["num_hidden_layers"])
        names = set()
        for h in range(heads):
            for l in range(layers):
                names.add(f"blocks.{h}.layers.{l}.weight")
                if config.get("medusa_fc_bias", False):
                    names.add(f"blocks.{h}.layers.{l}.bias")
        names |= {f"lm_heads.{h}.weight" for h in range(1 if config.get("original_lm_head") else heads)}
        truncated = int(config.get("truncated_vocab_size") or config["vocab_size"]) < int(config["vocab_size"])
        if truncated:
            names.add("token_map")
        return names, set() if truncated else {"token_map"}
    if kind == "draft-model" and config.get("model_type") in ("llama", "qwen2"):  # llama.py / qwen2.py
        names = {"model.embed_tokens.weight", "model.norm.weight"}
        for i in range(int(config["num_hidden_layers"])):
            names |= _llama_layer_names(f"model.layers.{i}.", config, qkv_bias=config["model_type"] == "qwen2")
        tied = bool(config.get("tie_word_embeddings", False))  # LlamaConfig's and Qwen2Config's default
        if not tied:
            names.add("lm_head.weight")
        return names, ({"lm_head.weight"} if tied else set())
    return None


def _check_names(kind: str, config: dict, names: set[str], where: Path) -> None:
    expected = vllm_names(kind, config)
    if expected is None:
        return
    required, optional = expected
    missing, unexpected = sorted(required - names), sorted(names - required - optional)
    if missing or unexpected:
        raise ValueError(f"{where}: the weights are not what vLLM loads as {KINDS[kind]} (missing {missing}, "
                         f"unexpected {unexpected})")


def _tensor_names(path: Path) -> tuple[set[str], torch.dtype | None]:
    """Names in a safetensors file and its floating dtype (the first floating tensor's)."""
    with safe_open(str(path), framework="pt") as f:
        names = set(f.keys())
        dtype = next((f.get_slice(n).get_dtype() for n in sorted(names)
                      if f.get_slice(n).get_dtype() in ("BF16", "F16", "F32")), None)
    return names, {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(dtype)


# ---------------------------------------------------------------- config fields

def _compat_config(config: dict, dtype: torch.dtype | None, notes: list[str]) -> dict:
    """rope_theta beside rope_parameters, torch_dtype where missing (see the module docstring)."""
    config = dict(config)
    rope = config.get("rope_parameters")
    if isinstance(rope, dict) and "rope_theta" in rope and config.get("rope_theta") != rope["rope_theta"]:
        config["rope_theta"] = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default" and "rope_scaling" not in config:
            config["rope_scaling"] = {k: v for k, v in rope.items() if k != "rope_theta"}
        notes.append(f"config.json: rope_theta {rope['rope_theta']} written beside rope_parameters "
                     "(vLLM on transformers 4 reads rope_theta, else takes 10000)")
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        if not config.get("torch_dtype"):
            config["torch_dtype"] = name
        if "dtype" in config and not config["dtype"]:
            config["dtype"] = name
    return config


def _write_config(out: Path, config: dict) -> None:
    (out / CONFIG).write_text(json.dumps(config, indent=1))


# ---------------------------------------------------------------- per kind

def _eagle3(src: Path, out: Path, config: dict) -> Exported:
    names, dtype = _tensor_names(src / WEIGHTS)
    _check_names("eagle3", config, names, src / WEIGHTS)
    notes: list[str] = []
    layer_ids = list((config.get("eagle_config") or {}).get("eagle_aux_hidden_state_layer_ids") or [])
    if not layer_ids:
        raise ValueError(f"{src / CONFIG}: eagle_config.eagle_aux_hidden_state_layer_ids is missing")
    config = _compat_config(config, dtype, notes)
    config["eagle_aux_hidden_state_layer_ids"] = layer_ids
    config.setdefault("norm_before_residual", False)
    notes.append(f"config.json: eagle_aux_hidden_state_layer_ids {layer_ids} also at the top level "
                 "(where vLLM's model runner reads the target layers)")
    _write_config(out, config)
    shutil.copyfile(src / WEIGHTS, out / WEIGHTS)
    draft_vocab = int(config.get("draft_vocab_size") or config["vocab_size"])
    notes.append(f"draft vocabulary: {draft_vocab} of {config['vocab_size']} tokens, exactly as trained (d2t)")
    return Exported("eagle3", out, [CONFIG, WEIGHTS], [], notes, {"num_speculative_tokens": 3})


def _eagle1(src: Path, out: Path, config: dict) -> Exported:
    names, dtype = _tensor_names(src / WEIGHTS)
    _check_names("eagle1", config, names, src / WEIGHTS)
    notes: list[str] = []
    config = _compat_config(config, dtype, notes)
    config["draft_vocab_size"] = int(config["vocab_size"])
    _write_config(out, config)
    shutil.copyfile(src / WEIGHTS, out / WEIGHTS)
    if (src / eagle1_head.DRAFT_VOCAB).exists():
        notes.append(f"{eagle1_head.DRAFT_VOCAB} (verispec's draft-vocabulary ranking) not exported: vLLM's EAGLE-1 "
                     "has no draft vocabulary and fails on tensors it has no parameter for; it drafts over all "
                     f"{config['vocab_size']} tokens with the target's LM head (verispec: draft_vocab=0)")
    return Exported("eagle1", out, [CONFIG, WEIGHTS], [], notes, {"num_speculative_tokens": 3})


def _medusa(src: Path, out: Path, config: dict) -> Exported:
    names, _ = _tensor_names(src / WEIGHTS)
    _check_names("medusa", config, names, src / WEIGHTS)
    vocab, draft = int(config["vocab_size"]), int(config.get("truncated_vocab_size") or config["vocab_size"])
    notes = [f"{config['num_heads']} heads"]
    if draft == vocab:
        shutil.copyfile(src / CONFIG, out / CONFIG)  # already vLLM's MedusaConfig
        shutil.copyfile(src / WEIGHTS, out / WEIGHTS)
    else:
        _write_config(out, {**config, "truncated_vocab_size": vocab})
        save_file(_full_vocab_medusa(src / WEIGHTS, vocab), str(out / WEIGHTS))
        notes.append(f"draft vocabulary of {draft} tokens written over all {vocab}: vLLM 0.32 cannot load a "
                     "truncated Medusa (medusa.py slices lm_heads to token_map, then its loader asserts the full "
                     "vocabulary), so each head gets a row per token; a token outside token_map gets a copy of "
                     f"the row of the largest id inside it ({int(token_map_max(src / WEIGHTS))}), which keeps each "
                     "head's argmax, the token vLLM drafts, except when that id is the head's best")
    return Exported("medusa", out, [CONFIG, WEIGHTS], [], notes, {"num_speculative_tokens": int(config["num_heads"])})


def token_map_max(weights: Path) -> int:
    with safe_open(str(weights), framework="pt") as f:
        return int(f.get_tensor("token_map").max())


def _full_vocab_medusa(weights: Path, vocab: int) -> dict[str, torch.Tensor]:
    """Medusa tensors with lm_heads over the whole vocabulary and no token_map.

    Each token outside the map gets a copy of the row of one mapped token f, so it scores what
    f scores: a head's argmax (the token vLLM drafts; both take the first maximum) is then its
    argmax over the map, except when that is f itself and an unmapped id below f ties first.
    f is the largest mapped id: BPE gives the largest ids to its rarest merges, so f is the
    mapped token least likely to be a head's best. Verification is exact whatever is drafted."""
    with safe_open(str(weights), framework="pt") as f:
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    token_map = tensors.pop("token_map").long()
    filler = int(token_map.argmax())
    for name in [n for n in tensors if n.startswith("lm_heads.")]:
        rows = tensors[name]
        full = rows[filler].expand(vocab, -1).clone()
        full[token_map] = rows
        tensors[name] = full.contiguous()
    return tensors


def _draft_model(src: Path, out: Path, config: dict) -> Exported:
    files = sorted(src.glob("*.safetensors"))
    if (src / INDEX).is_file():  # what vLLM does too: only the shards the index names
        listed = set(json.loads((src / INDEX).read_text())["weight_map"].values())
        files = [f for f in files if f.name in listed]
    notes: list[str] = []
    if [f.name for f in files] == [WEIGHTS]:
        names, dtype = _tensor_names(files[0])
        _check_names("draft-model", config, names, files[0])
        shutil.copyfile(files[0], out / WEIGHTS)
    else:
        tensors: dict[str, torch.Tensor] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as handle:
                for name in handle.keys():
                    if name in tensors:
                        raise ValueError(f"{src}: tensor {name} is in more than one weight file")
                    tensors[name] = handle.get_tensor(name)
        _check_names("draft-model", config, set(tensors), src)
        dtype = next((t.dtype for t in tensors.values() if t.is_floating_point()), None)
        save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
        notes.append(f"weights of {len(files)} files merged into {WEIGHTS}: {', '.join(f.name for f in files)}")
    if vllm_names("draft-model", config) is None:
        notes.append(f"tensor names of {config['architectures'][0]} not checked here (vLLM loads it with its "
                     "own model code)")
    _write_config(out, _compat_config(config, dtype, notes))
    kept = [CONFIG, WEIGHTS]
    for name in DRAFT_MODEL_EXTRAS:
        if (src / name).is_file():
            shutil.copyfile(src / name, out / name)
            kept.append(name)
    merged = [f.name for f in files] + ([INDEX] if (src / INDEX).is_file() else [])
    return Exported("draft-model", out, kept, [], notes, {"num_speculative_tokens": 4}, merged=merged)


_WRITERS = {"eagle3": _eagle3, "eagle1": _eagle1, "medusa": _medusa, "draft-model": _draft_model}


# ---------------------------------------------------------------- command line

def _target(value: str) -> str:
    if value.lower() not in TARGETS:
        raise argparse.ArgumentTypeError(f"{value!r}: only 'vllm' is supported for now")
    return value.lower()


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "export", help="write a trained drafter in a serving engine's layout (vLLM)",
        description="Copy a drafter trained by 'verispec train' (EAGLE-3 or EAGLE-1 head, Medusa heads, distilled "
                    "draft model) into a directory vLLM loads as it is: config.json and one model.safetensors, "
                    "without training reports or verispec's own files.")
    p.add_argument("--to", required=True, type=_target, metavar="ENGINE",
                   help="the engine: vllm (the only one for now)")
    p.add_argument("src", metavar="SRC", help="the drafter directory (a 'verispec train' --out)")
    p.add_argument("out", metavar="OUT", help="the directory to write (must not exist or be empty, unless --force)")
    p.add_argument("--force", action="store_true", help="replace OUT if it holds an earlier export")
    p.set_defaults(func=run)


def run(args) -> int:
    result = export(args.src, args.out, force=args.force, to=args.to)
    print(f"exported {KINDS[result.kind]} to {result.out}: {', '.join(result.files)}")
    for note in result.notes:
        print(f"  {note}")
    if result.dropped:
        print(f"  not copied (vLLM reads none of them): {', '.join(result.dropped)}")
    print(f"vLLM: --speculative-config '{json.dumps(result.speculative_config)}'")
    return 0
