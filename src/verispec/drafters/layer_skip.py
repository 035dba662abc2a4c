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

from types import SimpleNamespace

import torch

from ..calibrate import resolve_layer_skip
from ..engine.sampling import draw, probabilities
from ..engine.tree import TokenTree
from ..layers import check_skip, decoder_layers, skip_layers_view
from .base import DraftContext, register
from .draft_model import DraftModel

DEFAULT_K = 4
DEFAULT_THRESHOLD = 0.0


@register("layer-skip")
class LayerSkip(DraftModel):
    """Options: skip (a calibration file, or a list of layer indices to skip; default: the
    model's default calibration file), k (chain length; default from the calibration file, else
    4), threshold (stop drafting after a token with draft probability below it; default from the
    calibration file, else 0 = never), and draft-model's tree options (tree, depth, top_k,
    budget, children) to grow a tree instead of a chain."""

    def __init__(self, target, skip=None, k: int | None = None, threshold: float | None = None, tree=None,
                 depth: int = 6, top_k: int = 4, budget: int = 32, children: str = "topk"):
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
                x = draw(q, ctx.sampling, ctx.rng, len(ctx.tokens) + i)  # draft i is the token at that index
                qs.append(q)
                confidence = float(q[x])
            drafts.append(x)
            if i == k - 1 or confidence < self.threshold:  # Draft & Verify: stop when the draft is unsure
                break
            logits = self.lm.extend([x])[-1]
        self.cached = ctx.tokens + drafts[:-1]
        draft_probs = torch.stack([qs[0], *qs]) if qs else None  # row 0 (the root) is unused
        return TokenTree.chain(ctx.tokens[-1], drafts, draft_probs)
