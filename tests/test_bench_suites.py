"""Spec-Bench question loading: the real question.jsonl, selection, paths and URLs."""
from __future__ import annotations

import io
import json
from collections import Counter
from pathlib import Path

import pytest

from verispec.bench import suites

REAL = Path(__file__).resolve().parents[2] / "shared" / "data" / "spec_bench" / "question.jsonl"
needs_real = pytest.mark.skipif(not REAL.is_file(), reason=f"Spec-Bench question.jsonl not found at {REAL} "
                                                            "(the shared folder beside the repository)")


@needs_real
def test_real_question_file():
    qs = suites.load_questions(REAL)
    assert len(qs) == 480
    by_task = Counter(q.task for q in qs)
    assert list(by_task) == list(suites.TASKS) and set(by_task.values()) == {80}
    mt = [q for q in qs if q.task == "mt_bench"]
    assert {q.category for q in mt} == set(suites.MT_BENCH_CATEGORIES)
    assert all(len(q.turns) == 2 for q in mt) and all(len(q.turns) == 1 for q in qs if q.task != "mt_bench")


@needs_real
def test_per_task_takes_the_first_n_of_each_task():
    qs = suites.load_questions(REAL)
    chosen = suites.select(qs, per_task=3)
    assert len(chosen) == 18
    for task in suites.TASKS:
        assert [q.question_id for q in chosen if q.task == task] == [q.question_id for q in qs if q.task == task][:3]
    assert [q.question_id for q in suites.select(qs, tasks=["qa", "rag"], per_task=2)] == [321, 322, 481, 482]
    coding = suites.select(qs, tasks=["coding"])
    assert len(coding) == 10 and {q.category for q in coding} == {"coding"}
    with pytest.raises(ValueError, match="unknown task"):
        suites.select(qs, tasks=["poetry"])


@needs_real
def test_default_is_the_shipped_copy_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # outside the repository: the package data is found all the same
    shipped = suites.default_question_path()
    assert shipped is not None and shipped.parent.name == "spec_bench" and shipped.parent.parent.name == "assets"
    assert suites.resolve_questions(None) == shipped
    assert shipped.read_bytes() == REAL.read_bytes()  # an unchanged copy of the shared file
    assert {"LICENSE", "SOURCE.md"} <= {p.name for p in shipped.parent.iterdir()}


def test_no_default_path_asks_for_questions(tmp_path, monkeypatch):
    monkeypatch.setattr(suites, "default_question_path", lambda cwd=None: None)
    with pytest.raises(ValueError, match="--questions"):
        suites.resolve_questions(None)
    with pytest.raises(ValueError, match="does not exist"):
        suites.resolve_questions(tmp_path / "missing.jsonl")


LINES = [{"question_id": 1, "category": "writing", "turns": ["a", "b"]},
         {"question_id": 2, "category": "qa", "turns": ["c"]}]


def test_url_is_downloaded_once_and_cached(tmp_path, monkeypatch):
    calls = []

    def fake_urlopen(url, timeout=None):
        calls.append(url)
        return io.BytesIO("".join(json.dumps(x) + "\n" for x in LINES).encode())

    monkeypatch.setattr(suites.urllib.request, "urlopen", fake_urlopen)
    path = suites.resolve_questions(suites.SPEC_BENCH_URL, cache=tmp_path)
    assert [q.question_id for q in suites.load_questions(path)] == [1, 2] and calls == [suites.SPEC_BENCH_URL]

    def offline(url, timeout=None):
        raise suites.urllib.error.URLError("no network")

    monkeypatch.setattr(suites.urllib.request, "urlopen", offline)
    assert suites.resolve_questions(suites.SPEC_BENCH_URL, cache=tmp_path) == path  # from the cache
    with pytest.raises(ValueError, match="cannot download .* not cached"):
        suites.resolve_questions("https://example.org/other/question.jsonl", cache=tmp_path)


def test_malformed_lines_name_their_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(LINES[0]) + "\n" + '{"question_id": 2, "turns": ["x"]}\n')
    with pytest.raises(ValueError, match=r"q.jsonl:2"):
        suites.load_questions(path)
    path.write_text(json.dumps(LINES[0]) + "\n" + json.dumps(LINES[0]) + "\n")
    with pytest.raises(ValueError, match="appears twice"):
        suites.load_questions(path)
