"""OpenAI's response objects: whole completions and streamed chunks, for the legacy
completions endpoint ("text_completion") and for chat ("chat.completion")."""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Reply"]


@dataclass
class Reply:
    """The id, time and model shared by every object of one response."""

    chat: bool
    model: str
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        if not self.id:
            self.id = ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    def whole(self, text: str, finish_reason: str, usage: dict[str, Any]) -> dict[str, Any]:
        """The non-streamed response."""
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
        return {**self._head(chunk=False), "choices": [choice], "usage": usage}

    def first_chunk(self, include_usage: bool) -> dict[str, Any] | None:
        """Chat streams open with the assistant's role (empty content); completions have no opener."""
        if not self.chat:
            return None
        return self._chunk({"role": "assistant", "content": ""}, None, include_usage)

    def text_chunk(self, text: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk({"content": text} if self.chat else text, None, include_usage)

    def final_chunk(self, finish_reason: str, include_usage: bool) -> dict[str, Any]:
        return self._chunk({} if self.chat else "", finish_reason, include_usage)

    def usage_chunk(self, usage: dict[str, Any]) -> dict[str, Any]:
        """stream_options.include_usage: one last chunk with no choices and the usage."""
        return {**self._head(chunk=True), "choices": [], "usage": usage}

    def _chunk(self, content: dict[str, Any] | str, finish_reason: str | None, include_usage: bool) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": content, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": content, "logprobs": None, "finish_reason": finish_reason}
        chunk = {**self._head(chunk=True), "choices": [choice]}
        if include_usage:  # OpenAI: with include_usage, every chunk carries usage, null until the last
            chunk["usage"] = None
        return chunk

    def _head(self, chunk: bool) -> dict[str, Any]:
        if self.chat:
            kind = "chat.completion.chunk" if chunk else "chat.completion"
        else:
            kind = "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}
