"""A causal LM with its own KV cache: prefill, passes over token-tree nodes, commit.

The target uses it to verify drafts; a draft model uses the same class to grow trees.
Tree attention goes through transformers' supported 4D attention-mask path: context
positions are visible to every node, and inside the tree a node sees only its ancestors
and itself; position ids are context length + depth. Models with sliding-window layers
(Gemma-3) get one mask per layer type, the form transformers accepts for hybrid models,
and a cache that keeps every position so that the masks' sizes are the cache's.
"""
from __future__ import annotations

import torch
from transformers import DynamicCache

from .cache import cache_length, crop_to, keep_positions
from .tree import TokenTree, ancestor_matrix, depths_of

SUPPORTED_TREE_MODELS = ("llama", "gemma3_text", "gemma3")


class CachedLM:
    def __init__(self, model: torch.nn.Module):
        self.model = model
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
        self._feature_hook = None

    def capture_features(self) -> None:
        """From now on keep, after each pass, the target's features for every input position
        of that pass: the last hidden states, after the final norm, i.e. what the LM head
        reads ([positions, hidden]). Feature drafters (Medusa, EAGLE) draft from them.
        A hook on the base model sees every position, not only the rows whose logits are kept."""
        if self._feature_hook is None:
            def keep(module, args, output):
                self.features = output[0][0].detach()
            self._feature_hook = self.model.base_model.register_forward_hook(keep)

    def _new_cache(self) -> DynamicCache:
        # Without the config every layer keeps all positions: sliding-window layers then
        # support rollback and gather, and the per-type masks below apply the window.
        return DynamicCache() if self._hybrid else DynamicCache(config=self.model.config)

    @property
    def cached_len(self) -> int:
        return cache_length(self.cache)

    @property
    def max_positions(self) -> int | None:
        return getattr(self.model.config, "max_position_embeddings", None)

    def reset(self) -> None:
        self.cache = self._new_cache()

    def _run(self, ids: torch.Tensor, logits_to_keep: int = 0, **extra) -> torch.Tensor:
        with torch.inference_mode():
            out = self.model(
                input_ids=ids.to(self.device)[None], past_key_values=self.cache,
                use_cache=True, logits_to_keep=logits_to_keep, **extra,
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
        base, n_pending = self.cached_len, len(pending)
        n, n_aux = len(tree), len(tree.aux_tokens)
        self._tree_start, self._fed = base + n_pending, list(range(n + n_aux))
        ids = torch.tensor([*pending, *tree.tokens, *tree.aux_tokens])
        if tree.is_chain:  # plain causal attention is exactly the chain's ancestor mask
            return self._run(ids, logits_to_keep=n)
        _check_tree_support(self.model)
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
        visible_tree = ancestor_matrix(parents)[queries][:, keys]
        visible = torch.cat([torch.ones(len(queries), start, dtype=torch.bool), visible_tree], dim=1)
        query_pos = torch.tensor([start + depths[q] for q in queries])
        key_pos = torch.tensor([start + depths[k] for k in keys])
        return self._masks(visible, query_pos, key_pos)

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




def _check_tree_support(model) -> None:
    kind = getattr(model.config, "model_type", "?")
    if kind not in SUPPORTED_TREE_MODELS:
        raise NotImplementedError(
            f"tree attention is checked for model types {', '.join(SUPPORTED_TREE_MODELS)}, not {kind!r}; "
            "use a chain draft (the default) with this model"
        )
