"""`universal`: cross-tokenizer drafting, a draft model with another tokenizer (like
transformers' universal assisted generation). The two models meet in text:

1. the target's committed tokens are decoded to text (incrementally, with an overlap);
2. the text is re-tokenized for the draft: draft tokens that end well before the point where
   the text changed are kept (and so is the draft's KV cache for them), the rest of the text
   is re-encoded, so a token that the new text extends (" wor" -> " world") is redone;
3. the draft drafts k tokens greedily; their text is what they add to the draft's context;
4. that text is encoded with the target's tokenizer together with the last few committed
   target tokens, and only target tokens whose concatenation continues the committed text
   exactly are kept. A committed token that the new text would merge with (" th" + "e")
   cannot be re-cut, so the encoding that reproduces the committed tail unchanged is used.

The target tokens are proposed as a chain without a distribution (one-hot q): lossless
under sampling too. Both tokenizers must turn text into tokens and back unchanged (checked
on a probe text at construction).
"""
from __future__ import annotations

from bisect import bisect_right

from ..engine.target import CachedLM
from ..engine.tree import TokenTree
from .base import DraftContext, Drafter, register
from .draft_model import _common_prefix

PROBE_TEXT = "Hello, world! The quick brown fox jumps over 13 lazy dogs.\n  def f(x):\n    return x * 2  # done"


def decode_raw(tokenizer, ids, skip_special: bool = False) -> str:
    """Text of ids exactly as the tokens spell it (no clean-up of spaces)."""
    return tokenizer.decode(list(ids), skip_special_tokens=skip_special, clean_up_tokenization_spaces=False)


def encode_raw(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def special_prefix(tokenizer) -> list[int]:
    """The ids the tokenizer puts before any text (a BOS token, or nothing)."""
    with_specials = list(tokenizer("a")["input_ids"])
    plain = encode_raw(tokenizer, "a")
    if plain and with_specials[len(with_specials) - len(plain):] == plain:
        return with_specials[: len(with_specials) - len(plain)]
    return []


def check_text_round_trip(lm, role: str) -> None:
    """One clear error when a model cannot take part in cross-tokenizer drafting."""
    name = getattr(lm, "name", "?")
    tokenizer = getattr(lm, "tokenizer", None)
    fix = "use a draft with a tokenizer whose text round-trips (or draft-model with a same-tokenizer draft)"
    if tokenizer is None:
        raise ValueError(f"universal drafting goes through text, but the {role} model {name!r} has no tokenizer; {fix}")
    try:
        back = decode_raw(tokenizer, encode_raw(tokenizer, PROBE_TEXT))
    except Exception as err:  # a tokenizer that cannot even encode/decode the probe
        raise ValueError(f"universal drafting: the {role} model {name!r}'s tokenizer fails on a probe text "
                         f"({err}); {fix}") from None
    if back != PROBE_TEXT:
        raise ValueError(f"universal drafting needs decode(encode(text)) == text, but the {role} model {name!r}'s "
                         f"tokenizer turns {PROBE_TEXT!r} into {back!r}; {fix}")
    vocab = getattr(lm.model.config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ValueError(f"the {role} model {name!r}'s tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{vocab} embeddings; universal drafting needs a tokenizer that matches its model")


class IncrementalText:
    """Token ids -> text, decoding only what was appended (with `overlap` tokens of context so
    that spaces and multi-byte characters at the seam come out right); a full decode whenever
    the seam does not check out."""

    def __init__(self, tokenizer, skip_special: bool = True, overlap: int = 4):
        self.tokenizer, self.skip_special, self.overlap = tokenizer, skip_special, overlap
        self.ids: list[int] = []
        self.text = ""

    def reset(self) -> None:
        self.ids, self.text = [], ""

    def update(self, ids: list[int]) -> str:
        n = len(self.ids)
        if n and len(ids) >= n and ids[:n] == self.ids:
            start = max(0, n - self.overlap)
            head = decode_raw(self.tokenizer, ids[start:n], self.skip_special)
            full = decode_raw(self.tokenizer, ids[start:], self.skip_special)
            if full.startswith(head) and self.text.endswith(head) and "\ufffd" not in head:
                self.text += full[len(head):]
            else:
                self.text = decode_raw(self.tokenizer, ids, self.skip_special)
        else:
            self.text = decode_raw(self.tokenizer, ids, self.skip_special)
        self.ids = list(ids)
        return self.text


class Retokenizer:
    """Text -> draft token ids, re-encoding only the text after a safe cut: the last draft
    token that ends within the unchanged part of the text, minus `margin` tokens (a token at
    the seam may merge with what follows), never between two tokens of one character."""

    def __init__(self, tokenizer, margin: int = 2):
        self.tokenizer, self.margin = tokenizer, margin
        self.prefix = special_prefix(tokenizer)
        self.offsets = _has_offsets(tokenizer)
        self.reset()

    def reset(self) -> None:
        self.body: list[int] = []
        self.ends: list[int] = []  # character offset where each body token ends
        self.text = ""

    @property
    def ids(self) -> list[int]:
        return self.prefix + self.body

    def update(self, text: str) -> list[int]:
        if not self.offsets:
            self.body, self.text = encode_raw(self.tokenizer, text), text
            return self.ids
        same = _common_prefix(self.text, text)
        keep = max(0, bisect_right(self.ends, same) - self.margin)
        while 0 < keep < len(self.ends) and self.ends[keep - 1] == self.ends[keep]:
            keep -= 1
        cut = self.ends[keep - 1] if keep else 0
        enc = self.tokenizer(text[cut:], add_special_tokens=False, return_offsets_mapping=True)
        self.body = self.body[:keep] + list(enc["input_ids"])
        self.ends = self.ends[:keep] + [cut + end for _, end in enc["offset_mapping"]]
        self.text = text
        return self.ids


def _has_offsets(tokenizer) -> bool:
    try:
        return "offset_mapping" in tokenizer("a b", add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return False


def text_delta(tokenizer, context_ids: list[int], new_ids: list[int], context: int = 4) -> str:
    """The text new_ids add after context_ids ("" where that is not a clean append). A trailing
    incomplete character (a multi-byte character cut by the last token) is left out."""
    if not new_ids:
        return ""
    tail = context_ids[-context:]
    before = decode_raw(tokenizer, tail, skip_special=True)
    after = decode_raw(tokenizer, tail + new_ids, skip_special=True)
    if not after.startswith(before) or before.endswith("\ufffd"):
        return ""
    return after[len(before):].rstrip("\ufffd")


def continuation_ids(tokenizer, committed: list[int], text: str, max_back: int = 4,
                     vocab_size: int | None = None) -> list[int]:
    """Target token ids that, appended to the committed ids, spell committed text + a prefix of
    `text` exactly. The text is encoded together with the last r committed tokens (r = max_back
    down to 0) and the first encoding that reproduces those r tokens unchanged is used; then
    tokens are dropped from the end until the decoded continuation is a prefix of the text."""
    if not text or decode_raw(tokenizer, committed[-8:]).endswith("\ufffd"):
        return []  # nothing, or a committed text that ends inside a character: no text continues it
    for r in range(min(max_back, len(committed)), -1, -1):
        tail = committed[len(committed) - r:]
        tail_text = decode_raw(tokenizer, tail)
        if r and "\ufffd" in tail_text:
            continue
        ids = encode_raw(tokenizer, tail_text + text)
        if ids[:r] != tail:
            continue
        candidate = ids[r:]
        if vocab_size is not None:
            candidate = candidate[:next((i for i, t in enumerate(candidate) if not 0 <= t < vocab_size), len(candidate))]
        context = committed[len(committed) - max(r, 1):]  # check with at least one committed token before
        before = decode_raw(tokenizer, context)
        wanted = before + text
        while candidate:
            spelled = decode_raw(tokenizer, context + candidate)
            if spelled == wanted or (wanted.startswith(spelled) and "\ufffd" not in spelled[len(before):]):
                break
            candidate.pop()
        return candidate
    return []


@register("universal")
class Universal(Drafter):
    """Options: draft (a LoadedModel with its own tokenizer), k (draft tokens per step; the
    target chain may be longer or shorter), max_back (committed target tokens re-encoded with
    the drafted text at the seam)."""

    def __init__(self, target, draft=None, k: int = 4, max_back: int = 4):
        if draft is None:
            raise ValueError("method 'universal' needs a draft model: pass draft=verispec.load_model(...) "
                             "(CLI: --draft NAME_OR_PATH)")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1 or not isinstance(max_back, int) or max_back < 0:
            raise ValueError(f"universal needs an integer k >= 1 and max_back >= 0 (got k={k!r}, max_back={max_back!r})")
        check_text_round_trip(target, "target")
        check_text_round_trip(draft, "draft")
        self.t_tok, self.d_tok = target.tokenizer, draft.tokenizer
        self.t_vocab = target.model.config.vocab_size
        self.k, self.max_back = k, max_back
        self.lm = CachedLM(draft.model, draft=True)
        self.stop_ids = set(getattr(draft, "eos_token_ids", None) or [])
        self.target_text = IncrementalText(self.t_tok, skip_special=True)
        self.retokenizer = Retokenizer(self.d_tok)
        self.cached: list[int] = []  # draft ids whose keys/values the draft cache holds

    def begin(self, prompt: list[int]) -> None:
        self.lm.reset()
        self.cached = []
        self.target_text.reset()
        self.retokenizer.reset()

    def propose(self, ctx: DraftContext) -> TokenTree:
        root = ctx.tokens[-1]
        if ctx.max_depth == 0:
            return TokenTree.chain(root)
        text = self.target_text.update(ctx.tokens)
        if text.endswith("\ufffd"):  # the committed text ends inside a character: nothing to continue yet
            return TokenTree.chain(root)
        context = self.retokenizer.update(text)
        if not context:
            return TokenTree.chain(root)
        drafted = self._draft(context)
        delta = text_delta(self.d_tok, context, drafted)
        candidate = continuation_ids(self.t_tok, ctx.tokens, delta, self.max_back, self.t_vocab)
        return TokenTree.chain(root, candidate[: ctx.max_depth])

    def _draft(self, context: list[int]) -> list[int]:
        valid = min(_common_prefix(self.cached, context), len(context) - 1)  # feed >= 1 token for its logits
        self.lm.crop(valid)
        logits = self.lm.extend(context[valid:])[-1]
        fed, drafted = list(context), []
        for i in range(self.k):
            x = int(logits.argmax())
            if x in self.stop_ids:
                break
            drafted.append(x)
            if i < self.k - 1:
                logits = self.lm.extend([x])[-1]
                fed.append(x)
        self.cached = fed
        return drafted
