"""`layer-skip`: self-speculative decoding. The target itself, with some of its decoder layers
skipped, drafts a chain of k tokens (Zhang et al. 2023, Draft & Verify; Xia et al. 2024, SWIFT).

The draft is a second model object built from the target's own config with fewer layers,
whose parameters ARE the target's parameters (shared tensors, nothing copied), run with its
own KV cache: drafting never touches the target's cache. Its layers are numbered 0..m-1
by the model's own constructor, so its cache is an ordinary cache of m layers.

Which layers to skip is found once per model by `verispec calibrate --method layer-skip`
(verispec.calibrate) and saved as JSON with the model's identity; pass skip=FILE or
skip=[layer indices]. With no skip given, the default calibration file of the model is used.
Draft & Verify's early stop: drafting stops after a token whose draft probability is below
`threshold` (a draft-side decision, so the rules stay lossless).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import torch

from ..engine.sampling import probabilities, sample
from ..engine.tree import TokenTree
from .base import DraftContext, register
from .draft_model import DraftModel

DEFAULT_K = 4
DEFAULT_THRESHOLD = 0.0


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers; layer-skip needs a decoder-only Hugging Face "
                         "model (Llama, Gemma-3, ...)")
    return layers


def check_skip(skip, total: int) -> list[int]:
    """Sorted, distinct layer indices in [0, total) that leave at least one layer."""
    try:
        layers = sorted({int(i) for i in skip})
    except (TypeError, ValueError):
        raise ValueError(f"skip must be a list of layer indices or a calibration file, got {skip!r}") from None
    if any(not 0 <= i < total for i in layers) or len(layers) >= total:
        raise ValueError(f"skip must name layers in [0, {total}) and keep at least one of the {total} layers, "
                         f"got {list(skip)}")
    return layers


def skip_layers_view(model: torch.nn.Module, skip: list[int]) -> torch.nn.Module:
    """A model of the same class that runs only the layers not in `skip`, sharing the target's
    parameters and buffers (no copy). Built on the meta device, then every tensor is bound to
    the target's own tensor, so nothing of the target is modified."""
    total = len(decoder_layers(model))
    kept = [i for i in range(total) if i not in set(check_skip(skip, total))]
    config = copy.deepcopy(model.config)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.num_hidden_layers = len(kept)
    with torch.device("meta"):
        view = type(model)(config)
    source_params = dict(model.named_parameters(remove_duplicate=False))
    source_buffers = dict(model.named_buffers(remove_duplicate=False))
    for names, source, slot in ((view.named_parameters(remove_duplicate=False), source_params, "_parameters"),
                                (view.named_buffers(remove_duplicate=False), source_buffers, "_buffers")):
        for name, _ in list(names):
            source_name = _target_name(name, kept)
            if source_name not in source:
                raise ValueError(f"layer-skip cannot map {name} of {type(model).__name__} onto the target's weights")
            owner_path, _, attr = name.rpartition(".")
            getattr(view.get_submodule(owner_path), slot)[attr] = source[source_name]
    leftover = [n for n, t in [*view.named_parameters(), *view.named_buffers()] if t.is_meta]
    if leftover:
        raise ValueError(f"layer-skip left tensors unbound in {type(model).__name__}: {', '.join(leftover[:5])}")
    view.eval()
    view.generation_config = copy.deepcopy(getattr(model, "generation_config", None))
    return view


def _target_name(name: str, kept: list[int]) -> str:
    """model.layers.<j>.x of the view -> model.layers.<kept[j]>.x of the target; others unchanged."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "model" and parts[1] == "layers":
        parts[2] = str(kept[int(parts[2])])
    return ".".join(parts)


@register("layer-skip")
class LayerSkip(DraftModel):
    """Options: skip (a calibration file, or a list of layer indices to skip; default: the
    model's default calibration file), k (chain length; default from the calibration file, else
    4), threshold (stop drafting after a token with draft probability below it; default from the
    calibration file, else 0 = never), and draft-model's tree options (tree, depth, top_k,
    budget, children) to grow a tree instead of a chain."""

    def __init__(self, target, skip=None, k: int | None = None, threshold: float | None = None, tree=None,
                 depth: int = 6, top_k: int = 4, budget: int = 32, children: str = "topk"):
        from ..calibrate import resolve_layer_skip

        total = len(decoder_layers(target.model))
        layers, suggested = resolve_layer_skip(target, skip)
        self.skip = check_skip(layers, total)
        k = suggested.get("k", DEFAULT_K) if k is None else k
        threshold = suggested.get("threshold", DEFAULT_THRESHOLD) if threshold is None else threshold
        if not isinstance(threshold, (int, float)) or not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be a probability in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)
        view = skip_layers_view(target.model, self.skip)
        draft = SimpleNamespace(model=view, tokenizer=None, name=f"{getattr(target, 'name', '?')}[skip {self.skip}]")
        super().__init__(target, draft=draft, k=k, tree=tree, depth=depth, top_k=top_k, budget=budget, children=children)

    def propose(self, ctx: DraftContext) -> TokenTree:
        if ctx.max_depth == 0 or self.shape is not None or self.dynamic:
            return super().propose(ctx)
        k = min(self.k, ctx.max_depth)
        logits = self._catch_up(ctx.tokens)
        drafts, qs = [], []
        for i in range(k):
            if ctx.sampling.greedy:
                x = int(logits.argmax())
                confidence = float(torch.softmax(logits.float(), -1)[x]) if self.threshold > 0 else 1.0
            else:
                q = probabilities(logits, ctx.sampling)
                x = sample(q, ctx.rng)
                qs.append(q)
                confidence = float(q[x])
            drafts.append(x)
            if i == k - 1 or confidence < self.threshold:  # Draft & Verify: stop when the draft is unsure
                break
            logits = self.lm.extend([x])[-1]
        self.cached = ctx.tokens + drafts[:-1]
        draft_probs = torch.stack([qs[0], *qs]) if qs else None  # row 0 (the root) is unused
        return TokenTree.chain(ctx.tokens[-1], drafts, draft_probs)
