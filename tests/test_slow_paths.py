"""The LM head after keeping the last rows must take torch's one-mm path (not bmm over an
expanded weight), whatever the weights' requires_grad: see verispec.layers.keep_last.
Timing is scripts/bench_slow_paths.py's job; this checks the dispatch, which is what regresses."""
from __future__ import annotations

import torch
from torch.profiler import profile

from verispec.engine.target import CachedLM
from verispec.layers import keep_last, last_rows


def _lm_head_ops(model, run) -> list[str]:
    """The aten ops the LM head dispatches to when called on the input `run` gives it."""
    seen = []
    hook = model.lm_head.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    try:
        run()
    finally:
        hook.remove()
    with torch.inference_mode(), profile() as prof:
        model.lm_head(seen[-1])
    return [e.name for e in prof.events() if e.name in ("aten::mm", "aten::bmm", "aten::addmm")]


def test_catch_up_pass_lm_head_uses_one_mm(tiny):
    model = tiny.model.requires_grad_(False)  # what load_model does
    try:
        target = CachedLM(model)
        target.reset()
        ops = _lm_head_ops(model, lambda: target.extend([1, 2, 3, 4, 5], last_logits_only=True))
        assert ops == ["aten::mm"], ops
    finally:
        model.requires_grad_(True)


def test_plain_slice_would_take_bmm(tiny):
    """The premise: the int form (a strided slice) does fall back to bmm here; if torch ever
    folds it, keep_last is no longer needed (and this test says so)."""
    model = tiny.model.requires_grad_(False)
    try:
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.inference_mode():
            sliced = _lm_head_ops(model, lambda: model(input_ids=ids, logits_to_keep=1))
            kept = _lm_head_ops(model, lambda: model(input_ids=ids, logits_to_keep=keep_last(1, 5)))
        assert sliced == ["aten::bmm"] and kept == ["aten::mm"], (sliced, kept)
    finally:
        model.requires_grad_(True)


def test_keep_last_selects_the_same_rows():
    x = torch.randn(1, 7, 3)
    assert torch.equal(last_rows(x, 3), x[:, -3:]) and last_rows(x, 3).stride() == (9, 3, 1)
    assert keep_last(7, 7) == 0 and keep_last(9, 7) == 0 and keep_last(0, 7) == 0
    assert keep_last(2, 7).tolist() == [5, 6]
