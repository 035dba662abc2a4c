"""Times the catch-up pass (n new tokens, only the last one's logits kept) both ways: the
int `logits_to_keep` transformers slices with, and verispec's index form (layers.keep_last).

On a model with requires_grad_(False) (what load_model does) the slice sends the LM head
through bmm over an expanded weight; on AVX-512 bf16 CPUs that measured ~7x a plain pass.
Where this prints "slice/index" well above 1, the slow path exists on this machine and
keep_last is what avoids it. Usage:
    .venv/bin/python scripts/bench_slow_paths.py [--model smollm2-135m-instruct] [--dtype bfloat16] [--threads 1]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import verispec
from verispec.compat import cache_kwargs, new_cache
from verispec.layers import keep_last


def time_pass(model, context: torch.Tensor, n: int, keep, repeats: int) -> float:
    """Median seconds of a pass over n new tokens after `context`, keeping `keep` logits."""
    samples = []
    for _ in range(repeats + 1):  # the first one warms up
        cache = new_cache()
        with torch.inference_mode():
            model(input_ids=context, **cache_kwargs(model, cache), use_cache=True, logits_to_keep=1)
            start = time.perf_counter()
            model(input_ids=context[:, :n], **cache_kwargs(model, cache), use_cache=True, logits_to_keep=keep)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples[1:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    model = verispec.load_model(args.model, dtype=args.dtype).model
    context = torch.randint(100, 1000, (1, args.context), device=model.device)
    print(f"{args.model} {args.dtype}, {torch.get_num_threads()} threads, context {args.context}, "
          f"requires_grad={next(model.parameters()).requires_grad}")
    print(f"{'n':>4} {'slice ms':>9} {'index ms':>9} {'slice/index':>11}")
    for n in (1, 2, 4, 8, 16):
        sliced = time_pass(model, context, n, 1, args.repeats)
        indexed = time_pass(model, context, n, keep_last(1, n, model.device), args.repeats)
        print(f"{n:>4} {1e3 * sliced:9.1f} {1e3 * indexed:9.1f} {sliced / indexed:11.2f}")


if __name__ == "__main__":
    main()
