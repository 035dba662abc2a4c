"""Conversations -> prompt token ids, and generated ids -> answer text: the one prompt format
of the benchmark (verispec.bench) and of distillation data (verispec.training), so a drafter is
trained on the prompts it is measured on. Model code only: it sits just above the models."""
from __future__ import annotations

from typing import Any

from .compat import chat_template_ids

__all__ = ["ChatFormatter"]


class ChatFormatter:
    """Conversation -> prompt token ids with the tokenizer's chat template, the answer text
    as Spec-Bench keeps it (special tokens dropped, stripped). A tokenizer without a chat
    template gets a plain "User: ... / Assistant:" layout."""

    def __init__(self, lm: Any):
        self.tokenizer = getattr(lm, "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError(f"model {getattr(lm, 'name', '?')!r} has no tokenizer; a chat prompt needs one to "
                             "turn a conversation into token ids")
        self.chat_template = bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        if not self.chat_template:
            text = "".join(f"{'User' if m['role'] == 'user' else 'Assistant'}: {m['content']}\n\n" for m in messages)
            return list(self.tokenizer(text + "Assistant:")["input_ids"])
        return chat_template_ids(self.tokenizer, messages)

    def answer(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=True).strip()
