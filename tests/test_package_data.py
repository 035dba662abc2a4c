"""Shipped heads and the Spec-Bench questions are package data (verispec/assets), found without
the repository around them; the user's own trainings ($VERISPEC_HOME/drafters) come first."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import verispec
from verispec import assets
from verispec.bench import suites
from verispec.heads import drafter_dirs, find_drafter

MODEL = "smollm2-135m-instruct"
REPO = Path(__file__).resolve().parents[1]


def test_shipped_heads_live_in_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))  # an empty user cache
    package = Path(verispec.__file__).resolve().parent
    assert assets.DRAFTERS == package / "assets" / "drafters"
    target = SimpleNamespace(name=MODEL)
    for kind in ("eagle", "medusa"):
        found = find_drafter(target, kind, f"verispec train {kind}")
        assert found == assets.DRAFTERS / MODEL / kind
        assert {"config.json", "model.safetensors"} <= {p.name for p in found.iterdir()}
        assert json.loads((found / "config.json").read_text())  # a real file, not a Git LFS pointer


def test_the_user_cache_comes_first(tmp_path, monkeypatch):
    monkeypatch.setenv("VERISPEC_HOME", str(tmp_path))
    target = SimpleNamespace(name=f"/some/dir/{MODEL}")  # a model given by path: its folder name
    mine = tmp_path / "drafters" / MODEL / "eagle"
    assert drafter_dirs(target, "eagle") == [mine, assets.DRAFTERS / MODEL / "eagle"]
    mine.mkdir(parents=True)
    (mine / "config.json").write_text("{}")
    assert find_drafter(target, "eagle", "verispec train eagle") == mine


def test_shipped_questions_with_their_licence():
    path = suites.default_question_path()
    assert path == assets.SPEC_BENCH_QUESTIONS and path.is_file()
    assert len(suites.load_questions(path)) == 480
    source = (path.parent / "SOURCE.md").read_text()
    assert "hemingkx/Spec-Bench" in source and "fd2c1cd7d2201ef71db4c5f4e455008f017967bf" in source
    assert "Apache License" in (path.parent / "LICENSE").read_text()


def test_pyproject_ships_the_assets():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    setuptools = config["tool"]["setuptools"]
    assert setuptools["package-data"]["verispec.assets"] == ["drafters/**/*", "spec_bench/*"]
    # transformers' GGUF loader (the zoo's one-time conversion) refuses to run without accelerate
    assert any(dep.startswith("accelerate") for dep in config["project"]["dependencies"])
    assert not (REPO / "drafters").exists()  # one copy, inside the package
