"""Draft heads that read the target's features: Medusa heads and the EAGLE head."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from ..assets import DRAFTERS as SHIPPED_DRAFTERS
from ..models import verispec_home

# Trained heads small enough to ship are package data (verispec/assets/drafters/<model>/<kind>,
# found in editable and wheel installs alike); anything the user trains goes to $VERISPEC_HOME/drafters.


def drafter_dirs(target: Any, kind: str) -> list[Path]:
    """Where a trained `kind` drafter of this target is looked for, first hit wins: the user's
    cache ($VERISPEC_HOME/drafters/<model>/<kind>), then the heads shipped with the package."""
    name = Path(str(getattr(target, "name", "model"))).name
    return [verispec_home() / "drafters" / name / kind, SHIPPED_DRAFTERS / name / kind]


def find_drafter(target: Any, kind: str, train_hint: str) -> Path:
    for path in drafter_dirs(target, kind):
        if (path / "config.json").exists():
            return path
    name = getattr(target, "name", "M")
    raise ValueError(f"method {kind!r} needs trained heads: pass drafter=DIR (CLI: --drafter DIR), or train the "
                     f"default ones with '{train_hint} --model {name} --out {drafter_dirs(target, kind)[0]}'")
