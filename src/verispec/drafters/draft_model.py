"""`draft-model`: an independent smaller model with the same tokenizer drafts k tokens
autoregressively, keeping its own KV cache in step with the committed tokens.
"""
from __future__ import annotations

import time
from typing import Sequence

import torch

from ..draft_init import draft_for
from ..engine.sampling import draw, probabilities
from ..engine.target import CachedLM
from ..engine.tree import TokenTree
from ..vocab_subset import vocab_subset_copy
from .base import DraftContext, Drafter, register
from .draft_length import AdaptiveLength
from .lookup_splice import LookupSplice
from .tree_growth import CHILD_MODES, grow_dynamic, grow_static, static_shape


def check_same_vocabulary(target, draft) -> None:
    """Refuse a draft whose token ids mean something else than the target's."""
    t_tok, d_tok = getattr(target, "tokenizer", None), getattr(draft, "tokenizer", None)
    t_size, d_size = target.model.config.vocab_size, draft.model.config.vocab_size
    same = t_size == d_size and (t_tok is None or d_tok is None or t_tok.get_vocab() == d_tok.get_vocab())
    if not same:
        raise ValueError(
            f"the draft model's vocabulary differs from the target's ({d_size} vs {t_size} entries or different "
            "token ids); draft-model needs the same tokenizer. For a draft with another tokenizer use "
            "cross-tokenizer drafting (method 'universal')."
        )


@register("draft-model")
class DraftModel(Drafter):
    """Options: draft (a LoadedModel, or a spec for draft_init.load_draft: a zoo name or
    directory, "layers:0,1,2", "int4" / "int8" (the target's weight-only quantized copy),
    "int4:NAME"); min_confidence (a chain stops after a token the draft gives less than this
    probability; 0: never. Default 0.4, transformers' assistant_confidence_threshold: on the Qwen
    pair it took k="auto" from 1.45x to 1.60x, README stop 17); draft_vocab (None: the whole
    vocabulary; n: the draft's LM head scores only the first n token ids and the special ones,
    FR-Spec, see vocab_subset); lookup (0: off; n in 1..3: where the context's last n-gram or a
    longer one occurred before, its continuation drafts instead of the model when it promises more
    tokens per second, see lookup_splice; needs k="auto"); k (chain length, or "auto": chosen
    each step from the observed acceptance, the
    measured draft pass time and the target's pass time fitted over the draft length, from 0
    (no draft where drafting cannot pay) up to k_max; see draft_length); tree = None (a chain),
    a static shape as a list of rank paths, or "dynamic" (EAGLE-2, with depth, top_k, budget); children = how static-tree
    siblings are chosen when sampling: "topk" (deterministic), "sample" (with replacement),
    "sample-unique" (without replacement)."""

    def __init__(self, target, draft=None, k: int | str = 5, tree: str | Sequence[Sequence[int]] | None = None,
                 depth: int = 6, top_k: int = 4, budget: int = 32, children: str = "topk", k_max: int = 12,
                 min_confidence: float = 0.4, draft_vocab: int | None = None, lookup: int = 0):
        if draft is None:
            raise ValueError("method 'draft-model' needs a draft model: pass draft=verispec.load_model(...) "
                             "(CLI: --draft NAME_OR_PATH)")
        if k == "auto":
            k = min(4, int(k_max))  # the first steps' length, until the passes are timed
            self.adaptive = AdaptiveLength(k_start=k, k_max=int(k_max))
        else:
            self.adaptive = None
        if not 0.0 <= float(min_confidence) < 1.0:
            raise ValueError(f"min_confidence is a probability in [0, 1), got {min_confidence!r}")
        self.min_confidence = float(min_confidence)
        if isinstance(k, str) or k < 1 or depth < 1 or top_k < 1 or budget < 1 or int(k_max) < 1:
            raise ValueError(f"draft-model needs k (an integer or 'auto'), depth, top_k, budget, k_max >= 1 "
                             f"(got {k!r}, {depth}, {top_k}, {budget}, {k_max})")
        draft = draft_for(draft, target)  # a spec: a zoo name or directory, "int4" (the target's int4 copy), ...
        check_same_vocabulary(target, draft)
        if draft_vocab is not None:  # a head over the vocabulary's first ids only (vocab_subset): a cheaper draft pass
            draft = vocab_subset_copy(draft, int(draft_vocab))
        if children not in CHILD_MODES:
            raise ValueError(f"children must be one of {', '.join(CHILD_MODES)}, got {children!r}")
        if isinstance(tree, str) and tree not in ("chain", "dynamic"):
            raise ValueError(f"tree must be 'chain' (or None: a chain of k), 'dynamic', or a static tree as a list "
                             f"of rank paths, e.g. [[0], [1], [0, 0]]; got {tree!r}")
        if lookup and (self.adaptive is None or tree not in (None, "chain")):
            raise ValueError("draft-model's lookup weighs a prompt-lookup continuation against the draft by the measured "
                             "costs: it needs k='auto' and a chain (tree=None)")
        self.splice = LookupSplice(lookup) if lookup else None
        self.lm = CachedLM(draft.model, draft=True)
        self.k, self.depth, self.top_k, self.budget, self.children = int(k), int(depth), int(top_k), int(budget), children
        self.shape = None if tree in (None, "chain", "dynamic") else static_shape(tree)
        self.dynamic = tree == "dynamic"
        self.cached: list[int] = []  # the tokens whose keys/values the draft cache holds

    def begin(self, prompt: list[int]) -> None:
        self.lm.reset()
        self.cached = []
        if self.adaptive:
            self.adaptive.begin()

    def propose(self, ctx: DraftContext) -> TokenTree:
        if self.splice:
            self.splice.begin_step()
        if ctx.max_depth == 0:
            return TokenTree.chain(ctx.tokens[-1])
        if self.shape is not None or self.dynamic:
            return self._propose_tree(ctx)
        k = min(self.adaptive.next() if self.adaptive else self.k, ctx.max_depth)
        copied = self.splice.choose(ctx.tokens, ctx.max_depth, self.adaptive, k) if self.splice else []
        if copied:  # the context's continuation beats drafting: free tokens (the draft's cache catches up later)
            self.adaptive.drafted(0, 0.0)
            return TokenTree.chain(ctx.tokens[-1], copied)
        if k == 0:  # drafting does not pay now: a plain step (the draft's cache catches up later)
            self.adaptive.drafted(0, 0.0)
            return TokenTree.chain(ctx.tokens[-1])
        logits = self._catch_up(ctx.tokens)
        started = time.perf_counter()
        drafts, qs = [], []
        for i in range(k):
            if ctx.sampling.greedy:  # no distribution needed: greedy verification compares tokens
                x = int(logits.argmax())
            else:
                q = probabilities(logits, ctx.sampling)
                x = draw(q, ctx.sampling, ctx.rng, len(ctx.tokens) + i)  # draft i is the token at that index
                qs.append(q)
            drafts.append(x)
            if i == k - 1 or self._unsure(qs[-1] if qs else logits, x, probs=bool(qs)):
                break
            logits = self.lm.extend([x])[-1]
        self.cached = ctx.tokens + drafts[:-1]
        if self.adaptive:
            self.adaptive.drafted(len(drafts) - 1, time.perf_counter() - started)
        draft_probs = torch.stack([qs[0], *qs]) if qs else None  # row 0 (the root) is unused
        return TokenTree.chain(ctx.tokens[-1], drafts, draft_probs)

    def _unsure(self, scores: torch.Tensor, token: int, probs: bool) -> bool:
        """Whether the draft gives its own pick less than min_confidence: drafting past a token it
        doubts mostly buys tokens the target rejects. Only the draft's logits decide, so a shorter
        draft leaves verification lossless (sampling too: the length is fixed before the target looks)."""
        if self.min_confidence <= 0:
            return False
        p = scores if probs else torch.softmax(scores.float(), -1)  # the distribution the token came from
        return float(p[token]) < self.min_confidence

    def observe(self, tree, target_logits, verdict, new_tokens, features=None) -> None:
        copied = self.splice is not None and self.splice.used
        if self.splice:
            self.splice.observe(new_tokens)
        if self.adaptive and tree.is_chain:  # a copied chain times the target's pass, but is not the draft's acceptance
            self.adaptive.verified(tree.num_drafted, None if copied else len(verdict.accepted))

    def _propose_tree(self, ctx: DraftContext) -> TokenTree:
        root_logits = self._catch_up(ctx.tokens)
        self.lm.begin_tree(root_cached=True)
        expand = self.lm.feed_nodes
        if self.dynamic:
            tree = grow_dynamic(ctx.tokens[-1], root_logits, expand, ctx.max_depth, self.depth, self.top_k, self.budget,
                                sampling=ctx.sampling, start=len(ctx.tokens))
        else:
            tree = grow_static(ctx.tokens[-1], root_logits, self.shape, expand, ctx.sampling, ctx.rng,
                               ctx.max_depth, self.children, start=len(ctx.tokens))
        self.lm.crop(len(ctx.tokens))  # drop the tree; accepted tokens are fed at the next catch-up
        self.cached = list(ctx.tokens)
        return tree

    def _catch_up(self, tokens: list[int]) -> torch.Tensor:
        """Drop cached drafts the target rejected, feed the tokens the draft has not seen."""
        valid = _common_prefix(self.cached, tokens)
        valid = min(valid, len(tokens) - 1)  # the last token must be fed to get its logits
        self.lm.crop(valid)
        return self.lm.extend(tokens[valid:])[-1]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
