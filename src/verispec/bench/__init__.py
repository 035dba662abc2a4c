"""Spec-Bench-style benchmark: methods and Hugging Face peers side by side on the same prompts.

    from verispec.bench import BenchConfig, run_bench, build_report
    run_bench(BenchConfig(out="runs/quick", per_task=3, max_new_tokens=64))

suites   question files (Spec-Bench's question.jsonl: path, URL or the default location)
runner   the run: interleaved methods, warm-up, repeats, resumable answer files (JSONL)
peers    transformers' generate (greedy, prompt lookup, assisted, universal assisted)
metrics  speedup, mean accepted tokens, acceptance per position, time split, losslessness
report   report.md, metrics.json and PNG charts, rebuilt from the answer files
cli      `verispec bench ...` and `verispec bench report DIR`
"""
from .metrics import summarize
from .report import build_report
from .runner import BenchConfig, BenchResult, run_bench

__all__ = ["BenchConfig", "BenchResult", "build_report", "run_bench", "summarize"]
