"""Draft heads that read the target's features: Medusa heads and the EAGLE head."""
from __future__ import annotations

from pathlib import Path
from typing import Any

# Trained heads small enough to ship live in the repository's drafters/ folder (an editable
# install finds them); anything trained by the user goes to $VERISPEC_HOME/drafters.
REPO_DRAFTERS = Path(__file__).resolve().parents[3] / "drafters"


def drafter_dirs(target: Any, kind: str) -> list[Path]:
    """Where a trained `kind` drafter of this target is looked for, first hit wins: the user's
    cache ($VERISPEC_HOME/drafters/<model>/<kind>), then the repository's drafters/ folder."""
    from ..models import verispec_home
    name = Path(str(getattr(target, "name", "model"))).name
    return [verispec_home() / "drafters" / name / kind, REPO_DRAFTERS / name / kind]


def find_drafter(target: Any, kind: str, train_hint: str) -> Path:
    for path in drafter_dirs(target, kind):
        if (path / "config.json").exists():
            return path
    name = getattr(target, "name", "M")
    raise ValueError(f"method {kind!r} needs trained heads: pass drafter=DIR (CLI: --drafter DIR), or train the "
                     f"default ones with '{train_hint} --model {name} --out {drafter_dirs(target, kind)[0]}'")
