"""Make a same-tokenizer draft model: from a draft spec (`load_draft`), or from the target
itself: a subset of its layers (`layer_subset`), or its weight-only quantized copy (`quantize`).

There is often no smaller model sharing the target's tokenizer (SmolLM2-135M is the
smallest of its family). Keeping a few of the target's decoder layers, with its own
embeddings and head, gives a draft that agrees with the target well above chance out of
the box, and is the usual starting point for distillation (DistillSpec; layer pruning).
"""
from __future__ import annotations

import copy
import dataclasses

import torch

from .models import load_model
from .quantize import MODES as QUANT_MODES, quantized_copy

def draft_for(spec, lm):
    """A draft given as an option: a loaded model as is, or a spec (load_draft) loaded in the
    target's dtype and on its device."""
    if not isinstance(spec, str):
        return spec
    weights = next(lm.model.parameters())
    return load_draft(spec, lm, dtype=weights.dtype, device=weights.device)


def load_draft(spec: str, lm, dtype: str | torch.dtype = "auto", device: str | torch.device = "auto"):
    """The draft a spec names, for target `lm`: a zoo name or HF directory; "layers:0,1,2" (a
    subset of the target's layers); "int4" / "int8" (the target's own weight-only quantized
    copy: quantized self-speculation); "int4:M" / "int8:M" (draft M, itself a spec, quantized)."""
    spec = spec.strip()
    mode, _, rest = spec.partition(":")
    if mode in QUANT_MODES:
        return quantized_copy(load_draft(rest, lm, dtype, device) if rest else lm, mode)
    if spec.startswith("layers:"):
        try:
            layers = [int(x) for x in spec.split(":", 1)[1].split(",") if x.strip()]
        except ValueError:
            raise ValueError(f"draft {spec!r}: use layers:I,J,K with layer indices, e.g. layers:0,1,2,3") from None
        return layer_subset(lm, layers)
    return load_model(spec, dtype=dtype, device=device)


def _decoder(model: torch.nn.Module) -> torch.nn.Module:
    inner = getattr(model, "model", None)
    if inner is None or not hasattr(inner, "layers"):
        raise ValueError(f"{type(model).__name__} has no .model.layers; layer subsets need a decoder-only HF model")
    return inner


def layer_subset(lm, layers: list[int]):
    """A LoadedModel-like copy of `lm` that keeps only `layers` (indices into the target's decoder layers)."""
    total = len(_decoder(lm.model).layers)
    if not layers or any(not 0 <= i < total for i in layers) or sorted(set(layers)) != list(layers):
        raise ValueError(f"layers must be increasing, distinct indices in [0, {total}), got {layers}")
    skeleton = copy.copy(lm.model.config)
    skeleton.num_hidden_layers = len(layers)
    if getattr(skeleton, "layer_types", None):
        skeleton.layer_types = [skeleton.layer_types[i] for i in layers]
    draft = type(lm.model)(skeleton).to(lm.model.dtype).eval()
    source = lm.model.state_dict()
    renamed = {}
    for key, value in source.items():
        new_key = _remap_layer_key(key, layers)
        if new_key is not None:
            renamed[new_key] = value.clone()
    draft.load_state_dict(renamed, strict=True)
    draft.to(next(lm.model.parameters()).device).requires_grad_(False)
    draft.generation_config = copy.deepcopy(lm.model.generation_config)
    return dataclasses.replace(lm, model=draft, name=f"{lm.name}[layers {','.join(map(str, layers))}]")


def _remap_layer_key(key: str, layers: list[int]) -> str | None:
    """model.layers.<i>.x -> model.layers.<rank of i>.x; other keys unchanged; dropped layers -> None."""
    parts = key.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        i = int(parts[2])
        if i not in layers:
            return None
        parts[2] = str(layers.index(i))
        return ".".join(parts)
    return key
