"""Progress for anything that takes more than a few seconds: one library (tqdm, which
transformers depends on already) and one style for every command, always on stderr so that
stdout stays clean for output that may be piped.

    for batch in progress(batches, "tokenising"):          # a bar over an iterable
        ...
    with progress(total=n, desc="bench", unit="run") as bar:  # a bar advanced by hand
        bar.set_description_str("q1 writing · eagle"); bar.update()
    say("loading smollm2-135m-instruct", "verispec bench")  # one status line, above any bar

enabled=False gives a bar with the same methods that prints nothing (tqdm's disable).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable
from typing import Any

from tqdm import tqdm

__all__ = ["progress", "say"]


def progress(iterable: Iterable | None = None, desc: str | None = None, total: float | None = None, *,
             enabled: bool = True, unit: str = "it", leave: bool = True, **options: Any) -> tqdm:
    """A tqdm bar on stderr over `iterable`, or one advanced with .update(n) towards `total`
    (total=None: a counter without an ETA). Usable as a context manager; options go to tqdm."""
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=leave, disable=not enabled, file=sys.stderr,
                dynamic_ncols=True, **options)


def say(message: str, prefix: str = "verispec", enabled: bool = True) -> None:
    """One status line on stderr, "PREFIX: message", written above any bar in progress."""
    if enabled:
        tqdm.write(f"{prefix}: {message}", file=sys.stderr)
        sys.stderr.flush()
