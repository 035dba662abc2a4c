"""Token ids -> text pieces safe to send as they come: incremental decoding that never splits a
multi-byte character, and stop strings that cut the text at their first occurrence."""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any

__all__ = ["DONE", "TextStream", "sse"]

REPLACEMENT = "\ufffd"  # what a decoder makes of an incomplete UTF-8 sequence
DONE = "data: [DONE]\n\n"


def sse(payload: dict[str, Any]) -> str:
    """One server-sent event carrying a JSON object."""
    return "data: " + json.dumps(payload, ensure_ascii=False, separators=(",", ":")) + "\n\n"


class TextStream:
    """Accumulates a generation's token ids and hands out the text that is final.

    Each push decodes the whole id list (a token's text can depend on its neighbours, so
    decoding ids one by one is wrong) and returns the part past what was already handed out.
    Held back until more tokens resolve them: trailing U+FFFD characters (a character whose
    bytes span tokens, not complete yet) and a tail that could be the start of a stop string
    (it must not reach the client if the stop string completes). When a stop string appears,
    the text ends just before it and `stopped` turns True.
    """

    def __init__(self, decode: Callable[[list[int]], str], stops: Sequence[str] = ()):
        self._decode = decode
        self._stops = tuple(stops)
        self.ids: list[int] = []
        self.text = ""  # everything handed out so far
        self.stopped = False

    def push(self, new_ids: Sequence[int]) -> str:
        """Add one step's tokens; the new text that is safe to send (maybe "")."""
        if self.stopped:
            return ""
        self.ids.extend(new_ids)
        full = self._decode(self.ids)
        cut = self._find_stop(full)
        if cut is not None:
            return self._emit(full[:cut])
        end = len(full.rstrip(REPLACEMENT))
        return self._emit(full[: end - self._stop_prefix(full[:end])])

    def finish(self) -> str:
        """The rest of the text once generation ended: nothing is held back any more."""
        if self.stopped:
            return ""
        full = self._decode(self.ids)
        cut = self._find_stop(full)
        return self._emit(full if cut is None else full[:cut])

    def _emit(self, upto: str) -> str:
        # decoding is prefix-stable for the tokenizers verispec serves (byte-level BPE,
        # SentencePiece) outside incomplete characters, which are held back
        piece = upto[len(self.text):]
        self.text = upto
        return piece

    def _find_stop(self, full: str) -> int | None:
        """Where the first stop string starts (and `stopped` set), else None. A match can only
        start in the unsent text: a sent tail was never the start of a stop string."""
        hits = [i for i in (full.find(s, len(self.text)) for s in self._stops) if i >= 0]
        if not hits:
            return None
        self.stopped = True
        return min(hits)

    def _stop_prefix(self, text: str) -> int:
        """Length of the longest tail of `text` that a stop string starts with."""
        best = 0
        for stop in self._stops:
            for k in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:k]):
                    best = k
                    break
        return best
