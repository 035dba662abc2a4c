"""Checking a method's (or rule's) keyword options against its constructor before calling it,
so that a bad value (`--option k=abc`) is one clear error naming the option, the method and
what it takes, not a TypeError from deep inside the constructor.

The expected type of an option is its annotation (`k: int = 5`, `tree: Sequence[Sequence[int]] | None`),
or for an unannotated one the type of a bool, int or float default. Options whose type cannot be
told (no annotation, a default of None) are passed as given; the constructor checks their values.
"""
from __future__ import annotations

import collections.abc
import inspect
import os
import sys
import types
import typing
from pathlib import PurePath
from typing import Any, Callable

__all__ = ["check_options"]

_UNKNOWN = object()  # a type this module cannot check: any value passes


def check_options(owner: str, func: Callable, options: dict[str, Any], skip: tuple[str, ...] = ("self", "target"),
                  noun: str = "option") -> None:
    """Raise ValueError if `options` holds a key `func` does not take, or a value of the wrong type.
    owner names the method in messages, e.g. "method 'prompt-lookup'"."""
    params = {name: p for name, p in inspect.signature(func).parameters.items()
              if name not in skip and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise ValueError(f"{owner} has no {noun}(s) {', '.join(unknown)}; its {noun}s: {', '.join(params) or 'none'}")
    hints = _hints(func)
    for key, value in options.items():
        expected = hints.get(key, _UNKNOWN)
        if expected is _UNKNOWN:
            default = params[key].default
            expected = type(default) if type(default) in (bool, int, float) else _UNKNOWN
        if expected is not _UNKNOWN and _matches(value, expected) is False:
            raise ValueError(f"{owner}: {noun} {key}={value!r} is not valid: {key} takes {describe(expected)}")


def _hints(func: Callable) -> dict[str, Any]:
    """Annotations resolved in the function's module; one that does not resolve is left out."""
    try:
        return typing.get_type_hints(func)
    except Exception:  # one name that does not resolve (a TYPE_CHECKING import): resolve the others alone
        pass
    module = sys.modules.get(getattr(func, "__module__", ""), None)
    namespace = dict(vars(module)) if module else {}
    out = {}
    for name, annotation in getattr(func, "__annotations__", {}).items():
        if isinstance(annotation, str):
            try:
                annotation = eval(annotation, namespace)  # noqa: S307 - the annotation text of our own code
            except Exception:
                continue
        out[name] = annotation
    return out


def _matches(value: Any, hint: Any) -> bool | None:
    """True / False where the type can be checked, None where it cannot (then the value passes)."""
    if hint is Any or hint is _UNKNOWN:
        return None
    if hint is type(None) or hint is None:
        return value is None
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        results = [_matches(value, a) for a in args]
        return True if True in results else (None if None in results else False)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (os.PathLike, PurePath) or (isinstance(hint, type) and issubclass(hint, PurePath)):
        return isinstance(value, (str, os.PathLike))
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence, typing.Sequence):
        if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
            return False
        if not args or (container is tuple and not (len(args) == 2 and args[1] is Ellipsis)):
            return True if not args else None
        results = [_matches(v, args[0]) for v in value]
        return False if False in results else (None if None in results else True)
    if isinstance(hint, type):
        return isinstance(value, hint)
    return None


def describe(hint: Any) -> str:
    """What a type means to a user: "an integer", "a list of lists of integers", "a path or None"."""
    if hint is type(None) or hint is None:
        return "None"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or (hasattr(types, "UnionType") and origin is types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)] + (["None"] if type(None) in args else [])
        return " or ".join(dict.fromkeys(parts))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    names = {bool: "True or False", int: "an integer", float: "a number", str: "a string", os.PathLike: "a path"}
    if hint in names:
        return names[hint]
    if isinstance(hint, type) and issubclass(hint, PurePath):
        return "a path"
    container = origin or hint
    if container in (list, tuple, collections.abc.Sequence, typing.Sequence):
        if args and args[0] is not Ellipsis:
            inner = describe(args[0])
            return "a list of " + (_plural(inner) if not inner.startswith("a list") else inner.replace("a list", "lists", 1))
        return "a list"
    return f"a {getattr(hint, '__name__', str(hint))}"


def _plural(text: str) -> str:
    for article in ("an ", "a "):
        if text.startswith(article):
            text = text[len(article):]
            break
    return {"True or False": "booleans", "number": "numbers", "integer": "integers", "string": "strings",
            "path": "paths"}.get(text, text + "s")
