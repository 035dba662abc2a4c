"""`verispec serve`: an OpenAI-compatible HTTP server (completions and chat, streamed or not)
over one model, decoding with a speculative method. `create_app(lm, ...)` builds the ASGI app;
one generation runs at a time, the others wait in a bounded FIFO queue."""
from .app import create_app

__all__ = ["create_app"]
