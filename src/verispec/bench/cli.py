"""`verispec bench ...` (run or resume a suite) and `verispec bench report DIR` (rebuild the report)."""
from __future__ import annotations

import argparse
import ast
import shlex
import sys
from typing import Any

from .peers import PEERS
from .vllm_peer import VLLM_PEERS
from .report import build_report
from .runner import DEFAULT_METHODS, BenchConfig, run_bench

_EPILOG = """examples:
  verispec bench --model smollm2-135m-instruct --dtype bfloat16 --per-task 3 --max-new-tokens 64 \\
      --methods ar,prompt-lookup,hf-greedy,hf-prompt-lookup --out runs/quick
  verispec bench ... --option prompt-lookup.k=5 --option hf-prompt-lookup.prompt_lookup_num_tokens=5
  verispec bench ... --methods ar,draft-model,hf-assisted --draft layers:0,5,10,15,20,25
  verispec bench report runs/quick
Rerunning a command resumes it: questions already in a method's answer file are skipped."""


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "bench", help="benchmark methods and peers on Spec-Bench; `bench report DIR` rebuilds a report",
        description="Run methods and peers (transformers, vLLM) side by side on a question suite, interleaved per "
                    "question, and write Spec-Bench answer files, report.md and charts into --out.",
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m-instruct", help="zoo name or local Hugging Face directory")
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                   help=f"comma-separated verispec methods and peers ({', '.join(PEERS)}; vLLM: {', '.join(VLLM_PEERS)}, "
                        "after scripts/setup_vllm.sh); ar is always run (the baseline)")
    p.add_argument("--option", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="an option of one method, repeatable (e.g. prompt-lookup.k=5)")
    p.add_argument("--suite", default="spec-bench", choices=["spec-bench"])
    p.add_argument("--questions", metavar="PATH_OR_URL",
                   help="question.jsonl (default: the Spec-Bench question set shipped with verispec); "
                        "a URL is downloaded once and cached")
    p.add_argument("--tasks", help="comma-separated tasks (mt_bench, translation, summarization, qa, "
                                   "math_reasoning, rag) or categories; default all")
    p.add_argument("--per-task", type=int, metavar="N", help="the first N questions of each task")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (per question and turn, derived from it)")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--device", default="auto")
    p.add_argument("--repeats", type=int, default=1, help="time each question R times: medians and spread")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up generations per method before timing")
    p.add_argument("--draft", metavar="M",
                   help="draft model for draft-model, hf-assisted and vllm-draft-model: zoo name, HF directory, layers:I,J,... "
                        "(a subset of the target's layers), int4 / int8 (the target's weight-only quantized copy), "
                        "int4:M / int8:M (draft M quantized)")
    p.add_argument("--universal-draft", metavar="M", help="draft with another tokenizer for hf-universal "
                                                          "(default: --draft)")
    p.add_argument("--exact", action=argparse.BooleanOptionalAction, default="auto",
                   help="every verispec method (ar included) with row-invariant target passes (output identical to "
                        "ar in bf16 too); default: on for bfloat16/float16 on the CPU, off otherwise")
    p.add_argument("--rule", default="auto", choices=["auto", "gumbel"],
                   help="every verispec method's verification rule (ar included): gumbel = coupled seeded sampling, "
                        "whose outputs equal ar's at any temperature (then checked); a lossy rule goes per method, "
                        "--option M.rule=typical")
    p.add_argument("--no-traces", action="store_true", help="skip the per-task trace pages")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--out", metavar="DIR", help="output folder (required to run)")
    p.set_defaults(func=cmd_bench)
    sub = p.add_subparsers(dest="bench_command", metavar="{report}")
    r = sub.add_parser("report", help="rebuild report.md, metrics.json and charts from a run folder's answer files")
    r.add_argument("dir", metavar="DIR")
    r.set_defaults(func=cmd_report)


def parse_method_options(pairs: list[str], methods: list[str] | None = None) -> dict[str, dict[str, Any]]:
    """["prompt-lookup.k=5", ...] -> {"prompt-lookup": {"k": 5}}; values are Python literals
    where they parse (3, 0.5, True, None), else strings."""
    options: dict[str, dict[str, Any]] = {}
    for pair in pairs or []:
        target, sep, value = pair.partition("=")
        method, dot, key = target.rpartition(".")
        if not sep or not dot or not method or not key:
            raise ValueError(f"--option takes METHOD.KEY=VALUE (e.g. prompt-lookup.k=5), got {pair!r}")
        if methods is not None and method not in methods:
            raise ValueError(f"--option {pair!r}: method {method!r} is not in --methods ({', '.join(methods)})")
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            parsed = value
        options.setdefault(method, {})[key] = parsed
    return options


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_bench(args) -> int:
    if not args.out:
        raise ValueError("bench needs --out DIR (where answers, report and charts go); "
                         "or `verispec bench report DIR` to rebuild a report")
    methods = _split(args.methods) or []
    set_threads(args.threads)
    config = BenchConfig(
        out=args.out, model=args.model, methods=methods,
        options=parse_method_options(args.option, methods + (["ar"] if "ar" not in methods else [])),
        suite=args.suite, questions=args.questions, tasks=_split(args.tasks), per_task=args.per_task,
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed, dtype=args.dtype,
        device=args.device, repeats=args.repeats, warmup=args.warmup, draft=args.draft,
        universal_draft=args.universal_draft, traces=not args.no_traces, exact=args.exact,
        rule=args.rule,
        command="verispec " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:2] == ["bench"] else None,
    )
    result = run_bench(config, progress=not args.no_progress)
    if result.report is not None:
        print(result.report)
    return 130 if result.interrupted else 0


def set_threads(threads: int | None) -> None:
    """--threads: torch's CPU thread count for this process (the CLI's to set, not the library's)."""
    if threads is None:
        return
    if threads < 1:
        raise ValueError(f"--threads must be an integer >= 1, got {threads}")
    import torch

    torch.set_num_threads(threads)


def cmd_report(args) -> int:
    print(build_report(args.dir))
    return 0
