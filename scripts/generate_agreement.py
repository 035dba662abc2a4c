"""How often verispec's `ar` (plain and exact mode) emits what transformers' model.generate() emits.

Greedy, chat-formatted Spec-Bench first turns (the first N per task, taken task by task), same
stop tokens. In bfloat16 neither is guaranteed: generate() prefills the whole prompt in one
pass, verispec prefills all of it but the last token and then decodes the last one in a
one-token pass, so the prompt's cached keys/values can round differently, and exact mode only
makes verification rows equal to one-token rows. Prints the count and where each difference
starts. Usage:
    .venv/bin/python scripts/generate_agreement.py [--model smollm2-135m-instruct] [--dtype bfloat16]
        [--per-task 5] [--max-new-tokens 128] [--threads 2]
"""
from __future__ import annotations

import argparse

import torch

import verispec
from verispec.bench import suites


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def prompts(per_task: int) -> list[str]:
    by_task: dict[str, list[str]] = {}
    for q in suites.load_questions(suites.resolve_questions(None)):
        by_task.setdefault(q.task, []).append(q.turns[0])
    return [texts[i] for i in range(per_task) for texts in by_task.values() if i < len(texts)]


def reference(lm, ids: list[int], max_new: int, stop: set[int]) -> list[int]:
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False,
                                eos_token_id=sorted(stop) or None, pad_token_id=(sorted(stop) or [0])[0])
    tokens = out[0, len(ids):].tolist()
    cut = next((i + 1 for i, t in enumerate(tokens) if t in stop), None)
    return tokens[:cut]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--per-task", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lm = verispec.load_model(args.model, dtype=args.dtype)
    stop = set(lm.eos_token_ids or [])
    runs = {"ar": verispec.SpeculativeGenerator(lm, method="ar"),
            "ar --exact": verispec.SpeculativeGenerator(lm, method="ar", exact=True)}
    same = dict.fromkeys(runs, 0)
    texts = prompts(args.per_task)
    for n, text in enumerate(texts):
        ids = lm.encode(text, chat=True)
        want = reference(lm, ids, args.max_new_tokens, stop)
        cells = []
        for name, gen in runs.items():
            got = gen.generate(ids, max_new_tokens=args.max_new_tokens, stop_token_ids=sorted(stop)).token_ids
            at = first_difference(got, want)
            same[name] += at is None
            cells.append(f"{name}: {'same' if at is None else f'differs at {at}'}")
        print(f"prompt {n:2d} ({len(want)} tokens): " + "; ".join(cells), flush=True)
    for name, count in same.items():
        print(f"{name}: {count}/{len(texts)} identical to model.generate() ({args.dtype}, {args.max_new_tokens} new tokens)")


if __name__ == "__main__":
    main()
