"""`medusa`: Medusa-1 heads (Cai et al. 2024) draft a static token tree from the target's features.

After each pass the loop hands the drafter the features of the tokens it committed; the
heads read the newest one, the feature of the token just before the tree root (the root
itself is the target's own next token, whose feature comes with the next pass). Head d
then proposes the candidates at depth d, whatever their parent: a static tree of rank
paths (node [0, 1] = head 1's best token, then head 2's second best after it) grown by
tree_growth.grow_static, so sampling modes and the lossless multi-draft rule come for free.
The first step of a generation has no feature yet and drafts nothing (the prompt's pass,
as Medusa's own prefill).

Heads come from `verispec train medusa` (a directory in vLLM's Medusa layout, see
verispec.heads.medusa).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from ..engine.tree import TokenTree, depths_of
from ..heads import find_drafter
from ..heads.medusa import load_medusa, read_medusa_config
from ..models import tokenizer_identity
from .base import DraftContext, Drafter, register
from .tree_growth import CHILD_MODES, grow_static, static_shape

# Fallback rank accuracies (head d's rank-r candidate is right) for heads saved without
# measured ones: the rough shape of Medusa-1's reported top-k accuracies.
FALLBACK_RANK_ACCURACY = [[0.55, 0.10, 0.05, 0.03, 0.02], [0.30, 0.08, 0.04, 0.03, 0.02],
                          [0.20, 0.06, 0.03, 0.02, 0.02], [0.15, 0.05, 0.03, 0.02, 0.01]]


def default_tree(rank_accuracy: Sequence[Sequence[float]], nodes: int = 8) -> list[list[int]]:
    """The static shape of `nodes` rank paths with the most expected accepted tokens, if head d's
    rank-r candidate is right with probability rank_accuracy[d-1][r] independently (Medusa's
    tree construction: best-first growth by the product of the path's accuracies)."""
    depth = len(rank_accuracy)
    chosen: list[tuple[int, ...]] = []
    frontier = {(r,): float(a) for r, a in enumerate(rank_accuracy[0])}
    while frontier and len(chosen) < nodes:
        path = max(frontier, key=lambda p: (frontier[p], [-r for r in p]))
        score = frontier.pop(path)
        chosen.append(path)
        if len(path) < depth:
            frontier.update({path + (r,): score * float(a) for r, a in enumerate(rank_accuracy[len(path)])})
    return [list(p) for p in chosen]


def expected_accepted(paths: Sequence[Sequence[int]], rank_accuracy: Sequence[Sequence[float]]) -> float:
    """Expected tokens per step (bonus included) of a shape under the independence model above."""
    total = 1.0
    for path in paths:
        p = 1.0
        for d, r in enumerate(path):
            acc = rank_accuracy[d] if d < len(rank_accuracy) else []
            p *= float(acc[r]) if r < len(acc) else 0.0
        total += p
    return total


@register("medusa")
class MedusaDrafter(Drafter):
    """Options: drafter (directory written by `verispec train medusa`; default: the model's own,
    from $VERISPEC_HOME/drafters or the repository's drafters/ folder), tree (static
    shape as a list of rank paths, no deeper than the number of heads; default: the best
    `nodes`-node shape for the heads' measured rank accuracies), nodes (8), children (how
    siblings are chosen when sampling: "topk" (deterministic), "sample", "sample-unique").

    nodes=8: on this project's CPU a pass over 9 tokens costs ~1.05x a one-token pass, over 17
    ~1.3x; with heads of held-out top-1 0.41/0.25/0.18 (smollm2-135m-instruct, 20 min of
    training) 4 prompts x 128 tokens gave mean accepted tokens 1.40 / 1.44 / 1.62 / 1.59 and
    speedups 1.23x / 1.15x / 1.09x / 0.90x for 4 / 8 / 16 / 24 nodes (noisy: a shared machine).
    Better heads make bigger trees pay; a GPU affords Medusa's 64-node trees."""

    needs_features = True

    def __init__(self, target, drafter: str | Path | None = None, tree: Sequence[Sequence[int]] | None = None,
                 nodes: int = 8, children: str = "topk"):
        if drafter is None:
            drafter = find_drafter(target, "medusa", "verispec train medusa")
        if children not in CHILD_MODES:
            raise ValueError(f"children must be one of {', '.join(CHILD_MODES)}, got {children!r}")
        if nodes < 1:
            raise ValueError(f"medusa needs nodes >= 1, got {nodes}")
        config = read_medusa_config(drafter)
        _check_target(target, config, drafter)
        params = next(target.model.parameters())
        self.heads = load_medusa(drafter, device=params.device, dtype=params.dtype)
        accuracy = self.heads.meta.get("rank_accuracy") or FALLBACK_RANK_ACCURACY
        accuracy = [list(a) for a in accuracy[: self.heads.num_heads]]
        self.paths = default_tree(accuracy, nodes) if tree is None else [list(p) for p in tree]
        parents, ranks = static_shape(self.paths)
        depth = max(len(p) for p in self.paths)
        if depth > self.heads.num_heads:
            raise ValueError(f"the tree is {depth} deep but the drafter has only {self.heads.num_heads} heads "
                             "(head d drafts depth d)")
        if max(ranks) >= self.heads.draft_vocab_size:
            raise ValueError(f"the tree uses rank {max(ranks)}, over the heads' {self.heads.draft_vocab_size} tokens")
        self.shape = (parents, ranks)
        self.depth = depth
        self.children = children
        self.expected_accepted = expected_accepted(self.paths, accuracy)
        self.feature: torch.Tensor | None = None  # the newest committed feature, [hidden]
        self.featured = 0  # how many committed tokens have had their feature handed over

    def begin(self, prompt: list[int]) -> None:
        self.feature, self.featured = None, 0

    def observe(self, tree, target_logits, verdict, new_tokens, features=None) -> None:
        if features is not None and len(features):
            self.feature = features[-1]
            self.featured += len(features)

    def propose(self, ctx: DraftContext) -> TokenTree:
        root = ctx.tokens[-1]
        # The heads need the feature of the token right before the root: absent on the first step.
        if ctx.max_depth == 0 or self.feature is None or self.featured != len(ctx.tokens) - 1:
            return TokenTree.chain(root)
        depth = min(ctx.max_depth, self.depth)
        with torch.inference_mode():
            logits = self.heads(self.feature[None], upto=depth)[0]  # [depth, V'] over the draft vocabulary
        # Sampled children need q over the whole vocabulary; ranks can be taken in the draft vocabulary.
        deterministic = ctx.sampling.greedy or self.children == "topk"
        if not deterministic:
            logits = self.heads.to_full_vocab(logits)  # [depth, vocab]

        def expand(tokens, parents, nodes):  # a node at depth d gets head d+1's candidates
            depths = depths_of(parents)
            return logits[[depths[n] for n in nodes]]

        tree = grow_static(root, logits[0], self.shape, expand, ctx.sampling, ctx.rng, ctx.max_depth, self.children,
                           start=len(ctx.tokens))
        if deterministic and self.heads.truncated:  # draft-vocabulary indices -> token ids
            ids = self.heads.token_map[list(tree.tokens[1:])].tolist()
            tree = TokenTree((root, *ids), tree.parents)
        return tree


def _check_target(target, config: dict, directory) -> None:
    own = config.get("verispec", {})
    made_for = own.get("target", "?")
    mine = tokenizer_identity(target)
    hidden = int(target.model.config.hidden_size)
    if own.get("vocab_hash") is None:
        raise ValueError(f"{directory} has no record of the target it was trained for (config.json's "
                         "verispec.vocab_hash); train heads for this model with 'verispec train medusa'")
    if own["vocab_hash"] != mine["vocab_hash"] or int(config["vocab_size"]) != int(target.model.config.vocab_size) \
            or int(config["hidden_size"]) != hidden or own.get("hidden_size", hidden) != hidden:
        raise ValueError(f"the Medusa heads in {directory} were trained for {made_for!r} (hidden size "
                         f"{config['hidden_size']}, vocabulary {config['vocab_size']}), not for this target "
                         f"(hidden size {hidden}, vocabulary {target.model.config.vocab_size}, another tokenizer or "
                         "model); train heads for it with 'verispec train medusa --model ...'")
