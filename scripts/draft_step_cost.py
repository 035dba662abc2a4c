"""A draft's one-token pass: with the model's own attention, with the draft attention
(verispec.engine.draft_attention, what draft-model uses on the CPU), and with LM heads over the
vocabulary's first n ids too (draft-model's `draft_vocab`, verispec.vocab_subset); for an int4
draft on a CPU where verispec's int4 kernel is used, also with torch's int4 kernel; and how many
tokens of a text those ids cover (a token outside them is one the draft can never propose). Usage:
    .venv/bin/python scripts/draft_step_cost.py [--draft int4:qwen2.5-coder-0.5b-instruct] [--vocab 16384,32768,65536]
        [--dtype bfloat16] [--context 300] [--threads 2] [--text ../shared/data/spec_bench/question.jsonl]
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from verispec.draft_init import load_draft
from verispec.engine.target import CachedLM
from verispec.quantize import Int4Linear, quantized_copy
from verispec.vocab_subset import subset_ids, vocab_subset_copy


def one_token_ms(models: dict[str, tuple[torch.nn.Module, bool]], context: list[int], repeats: int) -> dict[str, float]:
    """Median one-token step per variant (its model and whether it runs as a draft), the variants'
    steps interleaved so that a slow stretch of a shared machine hits them all alike."""
    lms = {name: CachedLM(model, draft=draft) for name, (model, draft) in models.items()}
    for lm in lms.values():
        lm.extend(context[:-1])
    samples: dict[str, list[float]] = {name: [] for name in lms}
    for i in range(repeats + 3):  # 3 warm-up rounds
        for name, lm in lms.items():
            start = time.perf_counter()
            lm.extend([context[-1]])
            if i >= 3:
                samples[name].append(time.perf_counter() - start)
            lm.crop(len(context) - 1)
    return {name: statistics.median(v) * 1000 for name, v in samples.items()}


def text_tokens(draft, path: Path) -> list[int]:
    """The token ids of a JSONL file's "turns" (Spec-Bench's questions), or of a plain text file."""
    if path.suffix == ".jsonl":
        texts = [t for line in path.read_text().splitlines() if line.strip() for t in json.loads(line)["turns"]]
    else:
        texts = [path.read_text()]
    return [i for t in texts for i in draft.encode(t)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--draft", default="int4:qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--vocab", default="16384,32768,65536", help="comma-separated subset sizes")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--context", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--text", type=Path, default=Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    draft = load_draft(args.draft, None, dtype=args.dtype)
    context = [(13 * i) % 5000 + 100 for i in range(args.context)]
    tokens = text_tokens(draft, args.text) if args.text.exists() else []
    sizes = [int(v) for v in args.vocab.split(",")]
    variants = {"own": (draft.model, False), "draft": (draft.model, True)}
    variants.update({n: (vocab_subset_copy(draft, n).model, True) for n in sizes})
    int4 = {m.backend for m in draft.model.modules() if isinstance(m, Int4Linear)}
    if int4 == {"verispec"}:  # the same layers' codes through torch's kernel, for comparison
        base = load_draft(args.draft.split(":", 1)[1], None, dtype=args.dtype)
        variants["torch int4"] = (quantized_copy(base, "int4", backend="torch").model, True)
    ms = one_token_ms(variants, context, args.repeats)
    own = ms["own"]
    print(f"{draft.name}, {args.dtype}, context {args.context}, {args.threads} threads, medians of {args.repeats} "
          f"interleaved steps; coverage: {args.text.name}, {len(tokens)} tokens\n")
    print("| attention | draft head | one-token pass | vs the model's own | tokens covered |\n| --- | --- | :-: | :-: | :-: |")
    print(f"| the model's own | whole vocabulary | {own:.1f} ms | 1.00x | 100% |")
    print(f"| draft | whole vocabulary | {ms['draft']:.1f} ms | {ms['draft'] / own:.2f}x | 100% |")
    if "torch int4" in ms:
        print(f"| draft, torch's int4 kernel | whole vocabulary | {ms['torch int4']:.1f} ms | "
              f"{ms['torch int4'] / own:.2f}x | 100% |")
    for n in sizes:
        ids = set(subset_ids(draft, n).tolist())
        covered = sum(t in ids for t in tokens) / max(1, len(tokens))
        print(f"| draft | first {n} ids ({len(ids)} with the special ones) | {ms[n]:.1f} ms | {ms[n] / own:.2f}x | {covered:.1%} |")

if __name__ == "__main__":
    main()
