"""Drafters: each proposes a TokenTree for the target to verify. A method is a drafter plus a rule."""
from .base import DraftContext, Drafter, drafter_class, make_drafter, methods, register

# Importing the modules registers their methods.
from . import (  # noqa: E402,F401
    autoregressive, draft_model, eagle, hybrid, layer_skip, lookahead, medusa, prompt_lookup, recycling, retrieval,
    universal,
)

__all__ = ["DraftContext", "Drafter", "drafter_class", "make_drafter", "methods", "register"]
