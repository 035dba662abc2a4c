"""A bench run folder on disk: what each file is called and how answer files are read and
appended. The runner writes these files and the report reads them; both import this module
(and neither imports the other for it).

    run.json           the run's settings and environment (RUN_FILE)
    <method>.jsonl     Spec-Bench answer records, one line per question (answer_path)
    failures.jsonl     methods that raised on a question (FAILURES_FILE)
    traces/<method>/<task>.html   token trace pages (trace_path)
    report.md, metrics.json, *.png   the report (REPORT_FILE, METRICS_FILE, CHARTS)
"""
from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["BASELINE", "CHARTS", "FAILURES_FILE", "METRICS_FILE", "REPORT_FILE", "RUN_FILE", "TRACE_DIR",
           "answer_path", "append_answer", "read_answers", "trace_path"]

BASELINE = "ar"  # the method every run includes; speedups and losslessness are measured against it
RUN_FILE = "run.json"
FAILURES_FILE = "failures.jsonl"  # methods that raised on a question (the run went on without them)
TRACE_DIR = "traces"
REPORT_FILE = "report.md"
METRICS_FILE = "metrics.json"
CHARTS = {"speedup": "speedup.png", "accept_lengths": "accept_lengths.png", "time_split": "time_split.png"}


def answer_path(out: Path, method: str) -> Path:
    return Path(out) / f"{method}.jsonl"


def trace_path(out: Path, method: str, task: str) -> Path:
    return Path(out) / TRACE_DIR / method / f"{task}.html"


def read_answers(path: Path, repair: bool = False) -> list[dict]:
    """Records of an answer file. A torn last line (a run killed mid-write) is dropped, and
    with repair=True cut from the file so appends start on a clean line."""
    if not path.is_file():
        return []
    records, good_bytes = [], 0
    with open(path, "rb") as fh:
        for raw in fh:
            if not raw.endswith(b"\n"):
                break
            try:
                records.append(json.loads(raw))
            except json.JSONDecodeError:
                break
            good_bytes += len(raw)
    if repair and good_bytes != path.stat().st_size:
        with open(path, "r+b") as fh:
            fh.truncate(good_bytes)
    return records


def append_answer(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
