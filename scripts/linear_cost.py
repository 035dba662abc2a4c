"""Cost of one bf16 linear layer over 1..n rows: torch's own product against verispec's kernel
(kernels/bf16_linear.cpp, what load_model uses on CPUs without bf16 instructions), and whether
every row of the kernel's product equals its one-row product. Usage:
    .venv/bin/python scripts/linear_cost.py [--shapes 8960x1536,1536x8960,151936x1536] [--rows 1,2,4,8,16,32,300] [--threads 2]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from verispec import kernels


def median_ms(fn, repeats: int) -> float:
    fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="8960x1536,1536x8960,151936x1536", help="out x in, comma-separated (Qwen2.5-1.5B's)")
    ap.add_argument("--rows", default="1,2,4,8,16,32,300")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=15)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    op = kernels.bf16_linear()
    if op is None:
        raise SystemExit("verispec's bf16 kernel is not available here (see the warning above)")
    print(f"bf16 linear, {args.threads} threads, medians of {args.repeats}: torch's ms / verispec's ms (row-invariant?)")
    for shape in args.shapes.split(","):
        n, k = (int(v) for v in shape.split("x"))
        w = (torch.randn(n, k) / k ** 0.5).bfloat16()
        rows = [int(r) for r in args.rows.split(",")]
        x = torch.randn(max(rows), k).bfloat16()
        alone = op(x[:1], w)
        cells = []
        for m in rows:
            same = torch.equal(op(x[:m], w)[:1], alone)
            reps = max(3, args.repeats // (1 + m // 32))
            cells.append(f"{m}: {median_ms(lambda: F.linear(x[:m], w), reps):.2f} / "
                         f"{median_ms(lambda: op(x[:m], w), reps):.2f}{'' if same else ' (differs!)'}")
        print(f"{n}x{k}  " + "  ".join(cells))


if __name__ == "__main__":
    main()
