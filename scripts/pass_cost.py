"""Cost of one target pass over n new tokens (chain) or n tree nodes, relative to one token.

This is the room speculative decoding has: a draft of n tokens is worth verifying when
the tokens it adds per pass outweigh this ratio. Usage:
    .venv/bin/python scripts/pass_cost.py [--model smollm2-135m-instruct] [--dtype bfloat16] [--context 300] [--threads 1] [--no-pack] [--exact]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import verispec
from verispec.cpu_linear import Bf16Linear, PackedLinear
from verispec.engine.target import CachedLM
from verispec.engine.tree import TokenTree


def binary_tree(n: int, root: int) -> TokenTree:
    """A balanced binary tree of n nodes: the shape a tree drafter sends."""
    return TokenTree(tuple([root] + [(7 * i) % 1000 + 5 for i in range(1, n)]), tuple([-1] + [(i - 1) // 2 for i in range(1, n)]))


def time_pass(lm: CachedLM, context: list[int], tree: TokenTree, repeats: int) -> float:
    lm.reset()
    lm.extend(context[:-1])
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        lm.forward_tree(tree)
        samples.append(time.perf_counter() - start)
        lm.commit([0])
        lm.crop(len(context) - 1)
    return statistics.median(samples)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--no-pack", action="store_true",
                    help="keep torch's own linears (load_model swaps float32 ones for oneDNN and, without bf16 instructions, bf16 ones for verispec's kernel)")
    ap.add_argument("--tokens", type=lambda s: [int(n) for n in s.split(",")], default=[2, 4, 8, 12, 16, 24, 32, 48, 64],
                    help="comma-separated pass sizes to time (default 2,4,8,12,16,24,32,48,64)")
    ap.add_argument("--exact", action="store_true",
                    help="time exact-mode passes (verispec.engine.exact: every row as a one-token pass computes it)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = verispec.load_model(args.model, dtype=args.dtype, pack_linears=False if args.no_pack else None)
    lm = CachedLM(loaded.model, exact=args.exact)
    context = [(13 * i) % 5000 + 100 for i in range(args.context)]
    time_pass(lm, context, TokenTree.chain(context[-1]), 3)  # warm-up
    one = time_pass(lm, context, TokenTree.chain(context[-1]), args.repeats)
    packed = sum(isinstance(m, PackedLinear) for m in loaded.model.modules())
    bf16 = sum(isinstance(m, Bf16Linear) for m in loaded.model.modules())
    print(f"{args.model} {args.dtype}, context {args.context}, torch threads {torch.get_num_threads()}, "
          f"{packed} linears packed for oneDNN, {bf16} on verispec's bf16 kernel{', exact mode' if args.exact else ''}")
    print(f"one-token pass: {one * 1000:.1f} ms\n\n| new tokens | chain | tree (4D mask) |\n|---:|---:|---:|")
    for n in args.tokens:
        chain = time_pass(lm, context, TokenTree.chain(context[-1], [5 + i for i in range(n - 1)]), args.repeats)
        tree = time_pass(lm, context, binary_tree(n, context[-1]), args.repeats)
        print(f"| {n} | {chain / one:.2f}x | {tree / one:.2f}x |")


if __name__ == "__main__":
    main()
