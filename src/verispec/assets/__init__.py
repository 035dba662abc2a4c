"""Data shipped inside the package, found the same way in editable and wheel installs:
trained heads small enough to ship (``drafters/<model>/<kind>``, see drafters/README.md)
and the Spec-Bench question set (``spec_bench/``, see spec_bench/SOURCE.md)."""
from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent
DRAFTERS = ROOT / "drafters"
SPEC_BENCH_QUESTIONS = ROOT / "spec_bench" / "question.jsonl"
