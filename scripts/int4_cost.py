"""One int4 layer's product on the CPU: torch's int4 kernel against verispec's (kernels/int4_linear.cpp,
used on AVX2 CPUs without AVX-512), on the Qwen2.5-Coder-0.5B draft's shapes and the 1.5B's MLP,
with each one's error against the float product of the same dequantized weights. Usage:
    .venv/bin/python scripts/int4_cost.py [--rows 1,2,4,8] [--threads 2] [--repeats 50]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from verispec import kernels
from verispec.quantize import Int4Linear

sys.path.insert(0, str(Path(__file__).parent))
from linear_cost import median_ms  # noqa: E402  (one timing loop for the layer scripts)

SHAPES = [(896, 896), (128, 896), (4864, 896), (896, 4864), (151936, 896), (8960, 1536)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", default="1,2,4,8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    args = ap.parse_args()
    if kernels.int4_linear() is None:
        raise SystemExit("verispec's int4 kernel does not run on this machine (it needs an AVX2 CPU and a C++ compiler)")
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    print(f"{args.threads} threads, medians of {args.repeats}, ms as torch's / verispec's (relative error of each)\n")
    print("| layer (out x in) | " + " | ".join(f"{m} row{'s' if m > 1 else ''}" for m in rows) + " |")
    print("| --- |" + " :-: |" * len(rows))
    gen = torch.Generator().manual_seed(0)
    for n, k in SHAPES:
        layer = torch.nn.Linear(k, n, bias=False)
        with torch.no_grad():
            layer.weight.copy_(torch.randn(n, k, generator=gen) / k ** 0.5)
        layer = layer.to(torch.bfloat16)
        ours, theirs = Int4Linear(layer, backend="verispec"), Int4Linear(layer, backend="torch")
        cells = []
        with torch.inference_mode():
            for m in rows:
                x = torch.randn(m, k, generator=gen).to(torch.bfloat16)
                errs = []
                for q in (theirs, ours):
                    ref = x.float() @ q.dequantized().float().t()
                    errs.append(((q(x).float() - ref).norm() / ref.norm()).item())
                cells.append(f"{median_ms(lambda: theirs(x), args.repeats):.3f} / **{median_ms(lambda: ours(x), args.repeats):.3f}**"
                             f" ({errs[0]:.1e} / {errs[1]:.1e})")
        print(f"| {n} x {k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
