"""Drafters: each proposes a TokenTree for the target to verify. A method is a drafter plus a rule."""
from .base import DraftContext, Drafter, make_drafter, methods, register

# Importing the modules registers their methods.
from . import autoregressive, draft_model, prompt_lookup, recycling, retrieval  # noqa: E402,F401

__all__ = ["DraftContext", "Drafter", "make_drafter", "methods", "register"]
