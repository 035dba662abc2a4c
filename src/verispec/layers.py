"""A model's decoder layers and a view of it that skips some of them, sharing the target's
weights: the model code under the layer-skip drafter (verispec.drafters.layer_skip) and its
calibration (verispec.calibrate), both of which import it."""
from __future__ import annotations

import copy

import torch

__all__ = ["check_skip", "decoder_layers", "skip_layers_view"]


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ValueError(f"{type(model).__name__} has no .model.layers; layer-skip needs a decoder-only Hugging Face "
                         "model (Llama, Gemma-3, ...)")
    return layers


def swap_modules(model: torch.nn.Module, swaps: dict[torch.nn.Module, torch.nn.Module]) -> None:
    """Replace, in place, every submodule of `model` that is a key of `swaps` by its value (under
    every parent that holds it: a shared module is swapped everywhere)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if child in swaps:
                setattr(parent, name, swaps[child])


def copy_swapped(model: torch.nn.Module, swaps: dict[torch.nn.Module, torch.nn.Module]) -> torch.nn.Module:
    """A copy of `model` (eval mode) whose module tree is new, with each key of `swaps` replaced by
    its value, and every parameter and buffer the original's own tensor, shared read-only: the copy
    costs only what the swapped-in modules hold. `model` itself is unchanged."""
    # deepcopy's memo: the new modules stand in for the old ones, and tensors copy to themselves
    memo = {id(old): new for old, new in swaps.items()}
    memo.update({id(t): t for t in (*model.parameters(), *model.buffers())})
    return copy.deepcopy(model, memo).eval()


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


def keep_last(n: int | torch.Tensor, total: int, device=None) -> torch.Tensor | int:
    """What to pass as `logits_to_keep` (or to index hidden states with) to keep the last n of
    `total` positions, as an index tensor rather than the int transformers also accepts.

    Why: transformers keeps the last n rows as the slice hidden[:, -n:], a view whose batch
    stride still spans all `total` rows. torch's matmul only folds a 3D input into one 2D mm
    when its leading strides are contiguous, or when a weight requires grad; so on a model
    loaded with requires_grad_(False) the LM head (and any linear after the slice) falls back
    to bmm over an expanded weight, measured ~7x slower in bfloat16 on AVX-512 CPUs (a draft's
    catch-up pass, a prompt pass). Indexing with a tensor copies the n rows into a fresh,
    contiguous tensor, so the mm path is taken whatever the weights' flags.
    (tests/test_slow_paths.py checks the dispatch; scripts/bench_slow_paths.py times it.)"""
    if isinstance(n, torch.Tensor):  # already an index
        return n
    if n <= 0 or n >= total:
        return 0 if n >= total else n  # all rows: no slice; 0 keeps all in transformers too
    return torch.arange(total - n, total, device=device)


def last_rows(hidden: torch.Tensor, n: int | torch.Tensor) -> torch.Tensor:
    """hidden[:, -n:] as a fresh contiguous tensor (see keep_last for why not the slice); n may
    be keep_last's index already (a head called through the target's forward gets that)."""
    index = keep_last(n, hidden.shape[1], hidden.device)
    return hidden if isinstance(index, int) else hidden.index_select(1, index.to(hidden.device))
