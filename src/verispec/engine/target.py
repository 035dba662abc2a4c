"""A causal LM with its own KV cache: prefill, passes over token-tree nodes, commit.

The target uses it to verify drafts; a draft model uses the same class to grow trees.
Tree attention goes through transformers' supported 4D attention-mask path: context
positions are visible to every node, and inside the tree a node sees only its ancestors
and itself; position ids are context length + depth. Models with sliding-window layers
(Gemma-3) get one mask per layer type, the form transformers accepts for hybrid models,
and a cache that keeps every position so that the masks' sizes are the cache's.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from functools import lru_cache

import torch

from . import draft_attention, exact as exact_attention
from ..compat import cache_kwargs, new_cache
from ..layers import decoder_layers, keep_last
from .cache import cache_length, crop_to, keep_positions
from .tree import TokenTree, depths_of, shared_ancestor_matrix

SUPPORTED_TREE_MODELS = ("llama", "qwen2", "gemma3_text", "gemma3")  # each checked in test_tree_and_cache


class CachedLM:
    def __init__(self, model: torch.nn.Module, exact: bool = False, draft: bool = False):
        """exact: every pass over several tree nodes computes each row as a one-token pass
        would (see verispec.engine.exact); the prompt is prefilled as model.generate() does.
        draft: the model only drafts, so its one-token passes may take the cheaper one-row
        attention where it pays (verispec.engine.draft_attention); never for a target."""
        if exact and draft:
            raise ValueError("a CachedLM is a target (exact) or a draft, not both")
        self.model = model
        self.exact = exact
        self.fast_decode = draft and draft_attention.pays(model)
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        config = model.config
        self.layer_types = sorted(set(getattr(config, "layer_types", None) or ["full_attention"]))
        self.sliding_window = getattr(config, "sliding_window", None)
        self._hybrid = "sliding_attention" in self.layer_types
        self.cache = self._new_cache()
        self._tree_start = 0  # cache length when the current tree began
        self._fed: list[int] = []  # tree nodes in the cache after _tree_start, in cache order
        self.features: torch.Tensor | None = None  # see capture_features
        self._feature_hooks: list = []

    def capture_features(self, layers: tuple[int, ...] | None = None) -> None:
        """From now on keep, after each pass, the target's features for every input position
        of that pass ([positions, width]). Without layers: the last hidden states, after the
        final norm, i.e. what the LM head reads (Medusa, EAGLE-1). With layers (EAGLE-3): the
        hidden states entering each of those decoder layers, concatenated in that order
        (transformers' hidden_states[L]; vLLM's aux hidden state ids).
        Hooks see every position, not only the rows whose logits are kept.
        release_features() removes them: the model is shared (other generators, HF peers)."""
        if self._feature_hooks:
            return
        base = self.model.base_model
        if not layers:
            def keep(module, args, output):
                self.features = output[0][0].detach()
            self._feature_hooks = [base.register_forward_hook(keep)]
            return
        states: dict[int, torch.Tensor] = {}
        blocks = decoder_layers(self.model)

        def entering(index):
            def hook(module, args, kwargs):
                states[index] = (args[0] if args else kwargs["hidden_states"])[0].detach()
            return hook

        def assemble(module, args, output):
            self.features = torch.cat([states[i] for i in layers], -1)
            states.clear()
        self._feature_hooks = [blocks[i].register_forward_pre_hook(entering(i), with_kwargs=True) for i in set(layers)]
        self._feature_hooks.append(base.register_forward_hook(assemble))

    def release_features(self) -> None:
        """Undo capture_features: remove the hook from the model and drop the last features."""
        for hook in self._feature_hooks:
            hook.remove()
        self._feature_hooks = []
        self.features = None

    @contextmanager
    def features_captured(self, enabled: bool | tuple[int, ...] = True) -> Iterator[None]:
        """capture_features() for a `with` block (one generation), release_features() after it,
        even on error: the model is shared with other methods and HF peers, which must not run the hook."""
        if not enabled:
            yield
            return
        self.capture_features(None if enabled is True else tuple(enabled))
        try:
            yield
        finally:
            self.release_features()

    def _new_cache(self):
        # Without the config every layer keeps all positions: sliding-window layers then
        # support rollback and gather, and the per-type masks below apply the window.
        return new_cache() if self._hybrid else new_cache(self.model.config)

    @property
    def cached_len(self) -> int:
        return cache_length(self.cache)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def reset(self) -> None:
        self.cache = self._new_cache()

    def _run(self, ids: torch.Tensor, logits_to_keep: int = 0, **extra) -> torch.Tensor:
        one_row = draft_attention.attention(self.model) if self.fast_decode and len(ids) == 1 else nullcontext()
        with torch.inference_mode(), one_row:
            out = self.model(
                input_ids=ids.to(self.device)[None], **cache_kwargs(self.model, self.cache),
                use_cache=True, logits_to_keep=keep_last(logits_to_keep, len(ids), self.device), **extra,
            )
        self.last_output = out  # a draft head's other outputs (EAGLE: the predicted features)
        return out.logits[0]

    def extend(self, tokens: list[int], last_logits_only: bool = True, **extra) -> torch.Tensor:
        """Append tokens to the cache (a prefill, or catching up); logits [1 or len, vocab].
        extra: more model inputs (an EAGLE head's features)."""
        return self._run(torch.tensor(tokens), logits_to_keep=1 if last_logits_only else 0, **extra)

    def forward_tree(self, tree: TokenTree, pending: list[int] | tuple[int, ...] = ()) -> torch.Tensor:
        """One pass over `pending` context tokens (not yet cached: the prompt, on the first
        step), then every tree node, then any auxiliary nodes. Returns logits for the tree
        and auxiliary nodes only, [n_nodes + n_aux, vocab]; row i predicts node i's children.

        Folding the prompt into the first verification pass is what model.generate does
        too: the first token then comes from the same computation (which matters in
        bfloat16), and drafts are verified already on the first step.
        """
        if self.exact:
            return self._forward_tree_exact(tree, pending)
        return self._forward_tree(tree, pending)

    def _forward_tree(self, tree: TokenTree, pending) -> torch.Tensor:
        base, n_pending = self.cached_len, len(pending)
        n, n_aux = len(tree), len(tree.aux_tokens)
        self._tree_start, self._fed = base + n_pending, list(range(n + n_aux))
        ids = torch.tensor([*pending, *tree.tokens, *tree.aux_tokens])
        if tree.is_chain:  # plain causal attention is exactly the chain's ancestor mask
            return self._run(ids, logits_to_keep=n)
        _check_tree_support(self.model)
        if not (n_pending or n_aux or self._hybrid):  # the hot path: masks and positions cached per tree shape
            positions = base + _depth_tensor(tuple(tree.parents))
            return self._run(ids, logits_to_keep=n, position_ids=positions[None].to(self.device),
                             attention_mask=self._tree_additive(tree.parents, None, None, base))
        total = n_pending + n + n_aux
        visible = torch.zeros(total, base + total, dtype=torch.bool)
        visible[:, :base] = True
        visible[:n_pending, base:base + n_pending] = torch.tril(torch.ones(n_pending, n_pending, dtype=torch.bool))
        visible[n_pending:, base:base + n_pending] = True
        tree_start = base + n_pending
        visible[n_pending:n_pending + n, tree_start:tree_start + n] = tree.ancestor_mask()
        if n_aux:
            visible[n_pending + n:, tree_start:] = tree.aux_visible
        positions = torch.cat([torch.arange(base, tree_start), tree_start + torch.tensor([*tree.depths, *tree.aux_positions])])
        masks = self._masks(visible, positions, positions)
        return self._run(ids, logits_to_keep=n + n_aux, position_ids=positions[None].to(self.device), attention_mask=masks)

    def _forward_tree_exact(self, tree: TokenTree, pending) -> torch.Tensor:
        """Exact mode. The pending prompt and the root go in one pass with the model's own
        attention, exactly as model.generate() prefills (so exact-mode `ar` is generate()'s
        decoding: that prefill, then one-token passes); the tree's other nodes follow in a pass
        of their own with row-by-row attention over the now cached root."""
        if not pending:
            with exact_attention.attention(self.model):
                return self._forward_tree(tree, ())
        base, n_pending = self.cached_len, len(pending)
        root_logits = self._run(torch.tensor([*pending, tree.tokens[0]]), logits_to_keep=1)
        self._tree_start, self._fed = base + n_pending, [0]
        if len(tree) == 1 and not tree.aux_tokens:
            return root_logits
        before = self.features  # the prompt's and the root's (None when not captured)
        with exact_attention.attention(self.model):
            rest = self._forward_below_root(tree)
        if before is not None and self.features is not None:
            self.features = torch.cat([before, self.features])
        return torch.cat([root_logits, rest])

    def _forward_below_root(self, tree: TokenTree) -> torch.Tensor:
        """The tree's nodes but the root, then its auxiliary nodes, in one pass over the cached
        context and root (the root is the last cached token); logits [n - 1 + n_aux, vocab]."""
        n, n_aux, start = len(tree), len(tree.aux_tokens), self._tree_start
        over_tree = torch.zeros(n - 1 + n_aux, n + n_aux, dtype=torch.bool)  # columns: root, nodes, aux
        over_tree[:n - 1, :n] = tree.ancestor_mask()[1:]
        if n_aux:
            over_tree[n - 1:] = tree.aux_visible
        visible = torch.cat([torch.ones(len(over_tree), start, dtype=torch.bool), over_tree], dim=1)
        offsets = torch.tensor([*tree.depths, *tree.aux_positions])  # of the root, the nodes, the aux nodes
        query_pos = start + offsets[1:]
        masks = self._masks(visible, query_pos, start + offsets)
        ids = torch.tensor([*tree.tokens[1:], *tree.aux_tokens])
        logits = self._run(ids, logits_to_keep=len(ids), position_ids=query_pos[None].to(self.device),
                           attention_mask=masks)
        self._fed = list(range(n + n_aux))
        return logits

    def begin_tree(self, root_cached: bool = False) -> None:
        """Start a tree; root_cached: its root is the last cached token (a drafter's tree), not yet fed."""
        if root_cached:
            self._tree_start, self._fed = self.cached_len - 1, [0]
        else:
            self._tree_start, self._fed = self.cached_len, []

    def feed_nodes(self, tokens, parents, nodes: list[int], **extra) -> torch.Tensor:
        """Add tree nodes (whose ancestors are already fed or among `nodes`) to the cache; logits [len(nodes), vocab].

        tokens/parents describe the tree so far (parents[0] == -1 is the root); this lets a
        drafter grow a tree level by level with one pass per level.
        """
        _check_tree_support(self.model)
        depths = depths_of(parents)
        keys = self._fed + nodes
        start = self._tree_start
        masks = self._tree_masks(parents, nodes, keys, start, depths)
        positions = torch.tensor([start + depths[i] for i in nodes])[None].to(self.device)
        logits = self._run(torch.tensor([tokens[i] for i in nodes]), position_ids=positions, attention_mask=masks, **extra)
        self._fed = keys
        return logits

    def _tree_masks(self, parents, queries, keys, start, depths):
        """Masks for tree nodes `queries` over the context and the tree nodes `keys`."""
        if not self._hybrid:
            return self._tree_additive(parents, tuple(queries), tuple(keys), start)
        visible_tree = shared_ancestor_matrix(parents)[queries][:, keys]
        visible = torch.cat([torch.ones(len(queries), start, dtype=torch.bool), visible_tree], dim=1)
        query_pos = torch.tensor([start + depths[q] for q in queries])
        key_pos = torch.tensor([start + depths[k] for k in keys])
        return self._masks(visible, query_pos, key_pos)

    def _tree_additive(self, parents, queries: tuple[int, ...] | None, keys: tuple[int, ...] | None, start: int):
        """Additive mask [1, 1, queries, start + keys] of tree nodes over `start` context
        positions (all visible) and tree nodes `keys` (visible when an ancestor or self); None = every node.
        The tree block is cached per (shape, queries, keys): only the context part is new each pass."""
        block = _additive_block(tuple(parents), queries, keys, self.dtype, self.device)  # [queries, keys]
        mask = torch.zeros(block.shape[0], start + block.shape[1], dtype=self.dtype, device=self.device)
        mask[:, start:] = block
        return mask[None, None]

    def _masks(self, visible: torch.Tensor, query_pos: torch.Tensor, tree_key_pos: torch.Tensor):
        """Additive float masks [1, 1, queries, start + tree keys]: 0 where visible, dtype min elsewhere.
        Hybrid models get one per layer type: sliding layers also hide keys more than
        `sliding_window` positions back."""
        if not self._hybrid:
            return self._additive(visible)
        start = visible.shape[1] - len(tree_key_pos)
        key_pos = torch.cat([torch.arange(start), tree_key_pos])[None]
        in_window = (query_pos[:, None] - key_pos) < self.sliding_window
        return {"full_attention": self._additive(visible), "sliding_attention": self._additive(visible & in_window)}

    def _additive(self, visible: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros(visible.shape, dtype=self.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.dtype).min)
        return mask[None, None].to(self.device)

    def commit(self, kept_nodes: list[int]) -> None:
        """After a tree pass: keep the cached context plus these tree nodes (a root-first path)."""
        slots = [self._fed.index(n) for n in kept_nodes]
        keep_positions(self.cache, self._tree_start, slots)
        self._fed = []

    def crop(self, length: int) -> None:
        crop_to(self.cache, length)




@lru_cache(maxsize=1024)
def _additive_block(parents: tuple[int, ...], queries: tuple[int, ...] | None, keys: tuple[int, ...] | None,
                    dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[queries, keys] additive tree mask: 0 where the key is the query or its ancestor, dtype min elsewhere.
    Cached and shared: read it, never write it."""
    visible = shared_ancestor_matrix(parents)
    if queries is not None:
        visible = visible[list(queries)]
    if keys is not None:
        visible = visible[:, list(keys)]
    return torch.zeros(visible.shape, dtype=dtype).masked_fill_(~visible, torch.finfo(dtype).min).to(device)


@lru_cache(maxsize=1024)
def _depth_tensor(parents: tuple[int, ...]) -> torch.Tensor:
    """[n] int64 depths of a tree shape (position ids relative to the root's), cached per shape."""
    return torch.tensor(depths_of(parents))


def _check_tree_support(model) -> None:
    kind = getattr(model.config, "model_type", "?")
    if kind not in SUPPORTED_TREE_MODELS:
        raise NotImplementedError(
            f"tree attention is checked for model types {', '.join(SUPPORTED_TREE_MODELS)}, not {kind!r}; "
            "use a chain draft (the default) with this model"
        )
