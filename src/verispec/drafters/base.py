"""The method registry. The drafter protocol (Drafter, DraftContext) is the engine's
(verispec.engine.protocols), imported here so drafters find it beside register()."""
from __future__ import annotations

from typing import Any, Callable

from ..engine.protocols import DraftContext, Drafter
from ..options import check_options

__all__ = ["DraftContext", "Drafter", "drafter_class", "make_drafter", "methods", "register"]

_REGISTRY: dict[str, Callable[..., Drafter]] = {}


def register(name: str) -> Callable:
    """Class decorator: make the drafter available as method `name`."""

    def wrap(cls):
        _REGISTRY[name] = cls
        cls.method_name = name
        return cls

    return wrap


def methods() -> list[str]:
    return sorted(_REGISTRY)


def drafter_class(method: str) -> Callable[..., Drafter]:
    """The drafter class registered as `method` (its __init__ lists the method's options)."""
    if method not in _REGISTRY:
        raise ValueError(f"unknown method {method!r}; known methods: {', '.join(methods())}")
    return _REGISTRY[method]


def make_drafter(method: str, target: Any, **options: Any) -> Drafter:
    """Build the drafter of `method` for a LoadedModel target; options are the method's own."""
    cls = drafter_class(method)
    check_options(f"method {method!r}", cls.__init__, options)  # unknown keys, wrong types: one clear error
    try:
        return cls(target, **options)
    except ValueError as err:  # a value out of range: say which method refused it
        if str(err).startswith((method, f"method {method!r}")):
            raise
        raise ValueError(f"method {method!r}: {err}") from err
