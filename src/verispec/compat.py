"""Every transformers internal verispec touches, in one place (DESIGN.md, "Layering").

The bottom layer: it imports only torch and transformers, never another verispec module, so
a transformers upgrade is a change to this file alone. transformers is imported inside the
functions that need it, so importing verispec stays fast.

    KV cache       new_cache, cache_length, crop_cache, gather_cache, select_cache_rows, cache_append
    forward        cache_keyword, cache_kwargs      (`cache=` on new versions, `past_key_values=` on old)
    attention      register_attention, attention_implementation, sdpa_attention, attention_scale
                                                    (a named attention function with sdpa's masks, set per pass)
    tokenizer      chat_template_ids                (apply_chat_template's return type -> list[int])
    loading        transformers_progress            (incl. the GGUF loader's bare tqdm)
                   drop_quantizer                   (a dequantized GGUF model saved as plain weights)

Verified with transformers 5.0.0 (the oldest supported) through 5.24.0.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import torch

if TYPE_CHECKING:
    from transformers import Cache

# ----------------------------------------------------------------------------- attention

_registered_attention: set[str] = set()


def register_attention(name: str, function) -> str:
    """Register an attention function under `name` (idempotent), with sdpa's mask builder under
    the same name, so that a model whose config names it builds the masks sdpa gets; returns name."""
    if name not in _registered_attention:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

        AttentionInterface.register(name, function)
        AttentionMaskInterface.register(name, sdpa_mask)
        _registered_attention.add(name)
    return name


@contextlib.contextmanager
def attention_implementation(model: Any, name: str) -> Iterator[None]:
    """Run `model` with the registered attention `name` inside the block. transformers' attention
    layers and mask builders read config._attn_implementation at every forward, so setting it
    is enough; the previous value comes back after (a model shared with another user stays as it was)."""
    config = model.config
    before = config._attn_implementation
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = before


def attention_scale(query: torch.Tensor, kwargs: dict) -> float:
    """The score scale an attention function is called with (`scaling`; 1/sqrt(head dim) if none)."""
    scaling = kwargs.get("scaling")
    return query.shape[-1] ** -0.5 if scaling is None else scaling


def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    """transformers' own sdpa attention function."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


# ----------------------------------------------------------------------------- KV cache


def new_cache(config: Any = None) -> "Cache":
    """An empty DynamicCache. With `config`, its layers follow the model's layer types
    (sliding-window layers keep only the window); without, every layer keeps all positions,
    which is what rollback and gather need."""
    from transformers import DynamicCache

    return DynamicCache() if config is None else DynamicCache(config=config)


def cache_length(cache: "Cache") -> int:
    """Positions held by the cache."""
    return int(cache.get_seq_length())


def crop_cache(cache: "Cache", length: int) -> None:
    """Drop every cached position from `length` on."""
    excess = cache_length(cache) - length
    if excess < 0:
        raise ValueError(f"cannot crop a cache of {cache_length(cache)} positions to {length}")
    if excess:
        # The number of positions to remove, negated: what every transformers 5 takes (a
        # positive argument, once the target length, is refused by 5.24's layers).
        cache.crop(-excess)


def gather_cache(cache: "Cache", index: torch.Tensor) -> None:
    """Keep, in every layer, the positions `index` ([kept], ascending) along the sequence axis.

    Sliding-window layers cannot: they hold only the window, so their positions are not the
    cache's. Raises NotImplementedError for them (build the cache without a config)."""
    for layer in cache.layers:
        if getattr(layer, "is_sliding", False):
            raise NotImplementedError("cannot gather positions of a sliding-window cache layer; "
                                      "use a cache built without the model's config")
        if not getattr(layer, "is_initialized", True) or layer.keys is None or layer.keys.numel() == 0:
            continue  # a layer that shares another's KV, or never ran
        idx = index.to(layer.keys.device)
        layer.keys = layer.keys.index_select(-2, idx)  # [batch, kv_heads, positions, head_dim]
        layer.values = layer.values.index_select(-2, idx)


def select_cache_rows(cache: "Cache", rows: torch.Tensor) -> None:
    """Keep only the batch rows `rows` ([kept]) of every layer (finished rows leaving a batch)."""
    cache.batch_select_indices(rows)


def cache_append(cache: "Cache", keys: torch.Tensor, values: torch.Tensor,
                 layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Append keys/values [batch, kv_heads, new, head_dim] to cache layer `layer` (attention
    written by hand, e.g. a draft head's); returns the layer's keys and values, old and new.
    Positional only: the trailing argument changed from `cache_kwargs` (5.0) to **kwargs."""
    return cache.update(keys, values, layer)


# ----------------------------------------------------------------------------- forward


def cache_keyword(model: Any) -> str:
    """The forward keyword that takes a Cache, as model's class declares it: `cache` (newer
    transformers; 5.24 deprecates `past_key_values` for removal in 5.40) or `past_key_values`
    (older versions, and model classes that still declare only that name, e.g. remote code)."""
    return _declared_cache_keyword(type(model))


def cache_kwargs(model: Any, cache: "Cache | None") -> dict[str, Any]:
    """{keyword: cache} for `model(**inputs, **cache_kwargs(model, cache))`."""
    return {cache_keyword(model): cache}


@functools.lru_cache(maxsize=None)
def _declared_cache_keyword(model_class: type) -> str:
    """A pure function of the class, memoized. A class that declares neither name (a wrapper
    taking **kwargs) gets whatever this transformers' own models take."""
    from transformers import LlamaForCausalLM

    return _declared(model_class) or _declared(LlamaForCausalLM) or "past_key_values"


def _declared(model_class: type) -> str | None:
    try:
        params = inspect.signature(model_class.forward).parameters  # follows the deprecation wrapper
    except (AttributeError, TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):
        if name in params and params[name].kind is not inspect.Parameter.VAR_KEYWORD:
            return name
    return None


# ----------------------------------------------------------------------------- tokenizer


def chat_template_ids(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` with the tokenizer's chat template and a generation prompt.

    apply_chat_template(tokenize=True) returns a BatchEncoding on transformers 5 (a plain
    list, or a batched list, on older versions and on some tokenizers); always a list[int] here."""
    ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
    if hasattr(ids, "keys") and "input_ids" in ids:
        ids = ids["input_ids"]
    if isinstance(ids, torch.Tensor):
        ids = ids.tolist()
    if ids and isinstance(ids[0], (list, tuple)):  # batched form: one conversation
        ids = ids[0]
    return [int(i) for i in ids]


# ----------------------------------------------------------------------------- loading


@contextlib.contextmanager
def transformers_progress(enabled: bool) -> Iterator[None]:
    """Show transformers' progress bars, or silence them all, including the GGUF
    dequantization one (the GGUF loader calls a bare tqdm that ignores transformers' switch)."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    orig = getattr(gguf_utils, "tqdm", None)
    if orig is not None:
        gguf_utils.tqdm = lambda it, *a, **kw: it
    try:
        yield
    finally:
        if orig is not None:
            gguf_utils.tqdm = orig
        if was_enabled:
            hf_logging.enable_progress_bar()


def drop_quantizer(model: Any) -> None:
    """Forget how the weights were loaded (a GGUF quantizer) once they are plain tensors, so a
    saved config does not claim a quantization that no longer exists."""
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
