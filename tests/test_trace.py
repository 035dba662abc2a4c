"""Trace views: every new token marked by how it came (accepted / recovered / bonus / target)."""
from __future__ import annotations

import re

import pytest
import torch

from verispec import SpeculativeGenerator
from verispec import trace
from conftest import ScriptedDrafter, hf_greedy

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = [5, 17, 33, 2, 8, 61, 5, 17]
SPAN = re.compile(r'<span class="([^"]*)" title="token (\d+) · (\w+) · target pass (\d+)">([^<]*)</span>')


def scripted_output(tiny, correct: int, k: int = 4, max_new: int = 20):
    ref = hf_greedy(tiny, PROMPT, max_new)
    drafter = ScriptedDrafter(ref, len(PROMPT), k=k, correct=correct, vocab=96)
    return SpeculativeGenerator(tiny, method=drafter).generate(PROMPT, max_new_tokens=max_new)


def test_kinds_follow_the_script(tiny):
    out = scripted_output(tiny, correct=2)  # each step: 2 accepted drafts, then the target's fix
    assert out.kinds[:6] == ["accepted", "accepted", "recovered"] * 2
    out = scripted_output(tiny, correct=4)  # every draft right: the target adds a bonus token
    assert out.kinds[:10] == (["accepted"] * 4 + ["bonus"]) * 2
    assert trace.target_steps(out)[:10] == [1] * 5 + [2] * 5


def test_html_marks_each_token_with_kind_id_and_step(tiny, tmp_path):
    out = scripted_output(tiny, correct=2)
    path = trace.write_html(out, tiny, tmp_path / "sub" / "t.html", title="scripted <2 right>")
    page = path.read_text()
    spans = SPAN.findall(page)
    assert len(spans) == len(out.token_ids) == 20
    for (classes, token, kind, step, text), want_token, want_kind, want_step in zip(
            spans, out.token_ids, out.kinds, trace.target_steps(out)):
        assert classes.split()[0] == kind == want_kind
        assert int(token) == want_token and int(step) == want_step
        assert text == f"&lt;{want_token}&gt;"  # no tokenizer: ids are shown
    # steps: 3 tokens per target pass (2 accepted + 1 recovered)
    assert [int(s[3]) for s in spans][:7] == [1, 1, 1, 2, 2, 2, 3]
    # legend, summary, escaped title, self-contained (inline CSS, nothing fetched)
    for kind in trace.KINDS:
        assert f'class="k {kind}"' in page
    assert "scripted &lt;2 right&gt;" in page and "<style>" in page
    assert "target passes" in page and "mean accepted tokens" in page
    assert not re.search(r'(src|href)=|<script|@import|url\(', page)


def test_ar_is_all_target_tokens(tiny, tmp_path):
    out = SpeculativeGenerator(tiny, method="ar").generate(PROMPT, max_new_tokens=6)
    page = trace.render_html(out, tiny)
    assert [s[2] for s in SPAN.findall(page)] == ["target"] * 6
    assert [int(s[3]) for s in SPAN.findall(page)] == [1, 2, 3, 4, 5, 6]


def test_terminal_colours_and_legend(tiny, capsys, monkeypatch):
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    out = scripted_output(tiny, correct=4, max_new=10)
    trace.print_terminal(out, tiny)
    printed = capsys.readouterr().out
    assert "\x1b[" in printed  # ANSI colour codes
    plain = re.sub(r"\x1b\[[0-9;]*m", "", printed)
    assert f"<{out.token_ids[0]}>" in plain
    assert "legend" in plain and "accepted" in plain and "bonus" in plain and "recovered" in plain
    assert "8 accepted, 0 recovered, 2 bonus" in plain


def _byte_level_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, the cat sat on the mat"] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_multibyte_characters_are_not_broken():
    tok = _byte_level_tokenizer()
    text = "the cat 日本 🙂 sat"
    ids = tok(text)["input_ids"]
    pieces = trace.token_pieces(ids, tok, context=tok("hello")["input_ids"])
    assert len(pieces) == len(ids)
    assert "".join(pieces) == text
    assert "\ufffd" not in "".join(pieces)
    # each multi-byte character is split over byte tokens: the completing token carries it whole
    assert "日" in pieces and "本" in pieces and any(p.endswith("🙂") for p in pieces)
    assert pieces.count("") >= 2 + 3  # 3-byte CJK characters and a 4-byte emoji leave empty pieces


def test_special_tokens_are_shown_and_marked():
    tok = _byte_level_tokenizer()

    class LM:
        tokenizer = tok

    from verispec.engine.stats import GenerationStats
    from verispec.generator import GenerationOutput

    ids = tok("the cat")["input_ids"] + [tok.eos_token_id]
    out = GenerationOutput(ids, "", GenerationStats(), ["target"] * len(ids), [])
    page = trace.render_html(out, LM())
    spans = SPAN.findall(page)
    assert spans[-1][4] == "&lt;eos&gt;" and "special" in spans[-1][0]
    assert "".join(s[4] for s in spans[:-1]) == "the cat"
