"""What exact mode's attention costs: exact passes over n chain rows with `exact_rows` (rows in
fixed-shape calls of several) against one call per row (stop 18's arithmetic: `one_row_attention`
over exactly the row's keys), interleaved in one process, medians. Usage:
    .venv/bin/python scripts/exact_rows_cost.py [--model smollm2-135m-instruct] [--context 300] [--threads 2] [--query-rows 8]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import AttentionInterface

import verispec
from verispec.compat import attention_scale
from verispec.engine import exact, exact_rows
from verispec.engine.draft_attention import one_row_attention
from verispec.engine.target import CachedLM
from verispec.engine.tree import TokenTree


def per_row(module, query, key, value, attention_mask, **kwargs):
    """Every row its own call over exactly the keys it sees (a chain pass: a cache prefix)."""
    scale, q_len = attention_scale(query, kwargs), query.shape[2]
    calls = exact_rows.plan(None, q_len, key.shape[2], 1)
    return torch.cat([one_row_attention(query[:, :, r[0]:r[0] + 1], key[:, :, :n], value[:, :, :n], scale)
                      for r, n, _ in calls], dim=1), None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=12)
    ap.add_argument("--query-rows", type=int, default=exact_rows.QUERY_ROWS,
                    help=f"query-head rows per key head a call holds (exact_rows.QUERY_ROWS, default {exact_rows.QUERY_ROWS})")
    args = ap.parse_args()
    exact_rows.QUERY_ROWS = args.query_rows
    torch.set_num_threads(args.threads)
    lm = CachedLM(verispec.load_model(args.model, dtype="bfloat16").model, exact=True)
    exact.register()
    context = [(13 * i) % 5000 + 100 for i in range(args.context)]
    variants = {"one call per row": per_row, "exact_rows": exact.exact_attention}
    print(f"{args.model} bfloat16, exact mode, context {args.context}, {args.threads} threads, "
          f"{exact_rows.rows_per_call(lm.model.config.num_attention_heads // lm.model.config.num_key_value_heads)} rows a call, "
          f"medians of {args.repeats} interleaved passes\n")
    print("| chain rows | " + " | ".join(variants) + " | ratio |\n|---:|---:|---:|---:|")
    for n in (1, 2, 4, 8, 12):
        tree = TokenTree.chain(7, [5 + i for i in range(n - 1)])
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for rep in range(args.repeats + 2):
            for name, function in variants.items():
                AttentionInterface.register(exact.NAME, function)
                lm.reset()
                lm.extend(context)
                start = time.perf_counter()
                lm.forward_tree(tree)
                if rep >= 2:  # two warm-up rounds
                    samples[name].append(time.perf_counter() - start)
        ms = [statistics.median(samples[name]) * 1000 for name in variants]
        print(f"| {n} | " + " | ".join(f"{m:.1f} ms" for m in ms) + f" | {ms[1] / ms[0]:.2f}x |")
    AttentionInterface.register(exact.NAME, exact.exact_attention)


if __name__ == "__main__":
    main()
