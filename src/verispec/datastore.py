"""Token datastores for retrieval drafting (REST, He et al. 2023): build, save, load, look up.

A datastore is a directory of three files:

    datastore.json     header: format, version, the tokenizer's identity (name_or_path and a
                       hash of its vocabulary), sizes, sources, build settings
    tokens.npy         int32 [n]: every document's token ids, each followed by SEPARATOR (-1)
    suffix_array.npy   int32 [m]: the positions of all real tokens, sorted by the `sort_depth`
                       tokens that start there (separators sort before every token)

Both arrays are memory-mapped on load, so opening even a large datastore is instant. The
suffix array is "truncated": positions are ordered by their first `sort_depth` tokens only,
which is all a lookup of a context suffix of at most `sort_depth` tokens needs, and lets
the build stop after log2(sort_depth) rounds of prefix doubling.

Lookup: for suffix lengths m = min_suffix, min_suffix+1, ... the context's last m tokens are
binary-searched; the longest m that occurs wins (if the last m tokens never occur, no longer
suffix can). Up to `max_matches` of its occurrences, evenly spaced through the sorted range
(a stratified sample of the continuations), give the continuations to draft from.

CLI: `verispec datastore build --model M --from FILES... --out PATH [--generate N]`
(`add_parser` plugs it into verispec's argparse subcommands).
"""
from __future__ import annotations

import bisect
import html.parser
import json
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch

from .models import load_model, tokenizer_identity
from .progress import progress as progress_bar
from .progress import say

FORMAT = "verispec-datastore"
VERSION = 1
HEADER_FILE, TOKENS_FILE, INDEX_FILE = "datastore.json", "tokens.npy", "suffix_array.npy"
SEPARATOR = -1
DEFAULT_SORT_DEPTH = 16
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".html", ".htm", ".py")


# --- the datastore ------------------------------------------------------------------------

@dataclass
class Datastore:
    path: Path | None
    header: dict
    tokens: np.ndarray  # int32 [n], documents separated by SEPARATOR
    suffix_array: np.ndarray  # int32 [m]

    @property
    def sort_depth(self) -> int:
        return int(self.header["sort_depth"])

    @classmethod
    def load(cls, path: str | Path) -> "Datastore":
        path = Path(path).expanduser()
        header_file = path / HEADER_FILE
        if not header_file.is_file():
            raise ValueError(f"no datastore at {path} (missing {HEADER_FILE}); build one with "
                             "`verispec datastore build --model MODEL --from FILES... --out PATH`")
        header = json.loads(header_file.read_text())
        if header.get("format") != FORMAT or header.get("version") != VERSION:
            raise ValueError(f"{path} is not a verispec datastore of version {VERSION} "
                             f"(format {header.get('format')!r}, version {header.get('version')!r}); rebuild it "
                             "with `verispec datastore build`")
        try:
            tokens = np.load(path / TOKENS_FILE, mmap_mode="r")
            suffix_array = np.load(path / INDEX_FILE, mmap_mode="r")
        except FileNotFoundError as err:
            raise ValueError(f"datastore {path} is incomplete ({err.filename} is missing); rebuild it with "
                             "`verispec datastore build`") from None
        return cls(path, header, tokens, suffix_array)

    def check_tokenizer(self, identity: dict) -> None:
        """Refuse a datastore whose token ids come from another vocabulary."""
        built = self.header["tokenizer"]
        if built.get("vocab_hash") != identity.get("vocab_hash"):
            raise ValueError(
                f"datastore {self.path} was built with tokenizer {built.get('name_or_path')!r} "
                f"(vocabulary {built.get('vocab_hash', '?')[:19]}), but the model's tokenizer is "
                f"{identity.get('name_or_path')!r} (vocabulary {str(identity.get('vocab_hash'))[:19]}); its token ids "
                "would mean other text. Rebuild it for this model: "
                "`verispec datastore build --model MODEL --from FILES... --out PATH`"
            )

    def match(self, context: Sequence[int], max_suffix: int | None = None, min_suffix: int = 2
              ) -> tuple[int, int, int]:
        """(m, lo, hi): the longest suffix of `context` (m tokens, min_suffix <= m <= max_suffix,
        by default the sort depth) that occurs, and its occurrences suffix_array[lo:hi]; m = 0 and
        an empty range when none does."""
        max_suffix = self.sort_depth if max_suffix is None else max_suffix
        if max_suffix > self.sort_depth:
            raise ValueError(f"max_suffix {max_suffix} exceeds the datastore's sort depth {self.sort_depth}")
        best = (0, 0, 0)
        for m in range(min_suffix, min(max_suffix, len(context)) + 1):
            query = [int(t) for t in context[-m:]]
            keys = _SortedKeys(self.tokens, self.suffix_array, m)
            lo = bisect.bisect_left(keys, query)
            hi = bisect.bisect_right(keys, query, lo)
            if hi == lo:  # a longer suffix contains this one, so it cannot occur either
                break
            best = (m, lo, hi)
        return best

    def continuations(self, context: Sequence[int], depth: int, max_matches: int = 1024,
                      max_suffix: int | None = None, min_suffix: int = 2) -> np.ndarray:
        """[n, depth] int64: what followed the longest matching suffix of `context`, up to
        max_matches occurrences evenly spaced through the sorted range; SEPARATOR pads a row
        whose document ended. [0, depth] when nothing matches."""
        m, lo, hi = self.match(context, max_suffix, min_suffix)
        if hi == lo or depth < 1:
            return np.zeros((0, max(depth, 0)), dtype=np.int64)
        count = hi - lo
        picks = lo + (np.arange(min(count, max_matches), dtype=np.int64) * count) // min(count, max_matches)
        starts = np.asarray(self.suffix_array[picks], dtype=np.int64) + m
        index = np.minimum(starts[:, None] + np.arange(depth), len(self.tokens) - 1)  # the last token is a separator
        rows = np.asarray(self.tokens[index], dtype=np.int64)
        rows[np.cumsum(rows == SEPARATOR, axis=1) > 0] = SEPARATOR  # nothing after a document's end
        return rows


class _SortedKeys:
    """The suffix array as a sorted sequence of m-token lists, for bisect."""

    def __init__(self, tokens: np.ndarray, suffix_array: np.ndarray, m: int):
        self.tokens, self.suffix_array, self.m = tokens, suffix_array, m

    def __len__(self) -> int:
        return len(self.suffix_array)

    def __getitem__(self, i: int) -> list[int]:
        start = int(self.suffix_array[i])
        return self.tokens[start:start + self.m].tolist()


# --- building -----------------------------------------------------------------------------

def sort_suffixes(tokens: np.ndarray, sort_depth: int = DEFAULT_SORT_DEPTH, progress: bool = False) -> np.ndarray:
    """Positions of the real (non-separator) tokens, sorted by the tokens starting there: the
    first sort_depth of them rounded up to a power of two (prefix doubling); separators and the
    end rank below every token; ties by position."""
    n = len(tokens)
    if n >= 2**31:
        raise ValueError(f"a datastore holds fewer than 2**31 tokens, got {n}; build it from fewer files")
    rank = np.asarray(tokens, dtype=np.int64) - SEPARATOR  # separator -> 0, token t -> t + 1
    span = 1
    rounds = max(0, int(np.ceil(np.log2(max(sort_depth, 1)))))
    for _ in _progress(range(rounds), progress, "sorting suffixes"):
        following = np.zeros(n, dtype=np.int64)
        following[:n - span] = rank[span:]
        keys = rank * (int(rank.max()) + 1) + following  # ranks are < n + vocab, so this fits in int64
        _, rank = np.unique(keys, return_inverse=True)  # dense ranks of the first 2 * span tokens
        rank = rank.reshape(-1).astype(np.int64)
        span *= 2
    order = np.argsort(rank, kind="stable")
    order = order[np.asarray(tokens)[order] != SEPARATOR]
    return order.astype(np.int32)


def build_datastore(documents: Iterable[Sequence[int]], out: str | Path, identity: dict,
                    sort_depth: int = DEFAULT_SORT_DEPTH, progress: bool = False, **info: Any) -> Datastore:
    """Write a datastore of these token-id documents to directory `out` and return it loaded.
    `identity` is tokenizer_identity() of the model it is for; `info` goes into the header."""
    started = time.perf_counter()
    chunks, n_docs, n_real = [], 0, 0
    vocab_size = identity.get("vocab_size")
    for doc in documents:
        ids = np.asarray(doc, dtype=np.int64)
        if not ids.size:
            continue
        if ids.min() < 0 or (vocab_size and ids.max() >= vocab_size):
            raise ValueError(f"document {n_docs} has token ids outside [0, {vocab_size})")
        chunks += [ids.astype(np.int32), np.array([SEPARATOR], dtype=np.int32)]
        n_docs += 1
        n_real += ids.size
    if not n_docs:
        raise ValueError("no tokens to build a datastore from: every document is empty")
    tokens = np.concatenate(chunks)
    suffix_array = sort_suffixes(tokens, sort_depth, progress)
    out = Path(out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / TOKENS_FILE, tokens)
    np.save(out / INDEX_FILE, suffix_array)
    header = {
        "format": FORMAT, "version": VERSION, "tokenizer": identity, "sort_depth": int(sort_depth),
        "n_tokens": int(n_real), "n_documents": n_docs,
        "index_seconds": round(time.perf_counter() - started, 2),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **info,
    }
    (out / HEADER_FILE).write_text(json.dumps(header, indent=2) + "\n")
    return Datastore.load(out)


# --- text corpora -------------------------------------------------------------------------

class _HTMLText(html.parser.HTMLParser):
    """The readable text of a page: no scripts, styles or navigation (Sphinx's related bar,
    sidebar and footer); whitespace collapsed as a browser would, except inside <pre>."""

    SKIP_TAGS = {"script", "style", "head", "nav", "title"}
    SKIP_CLASSES = {"sphinxsidebar", "related", "footer", "headerlink"}
    BLOCKS = {"p", "div", "br", "li", "pre", "h1", "h2", "h3", "h4", "h5", "h6", "dt", "dd", "tr", "section",
              "table", "ul", "ol", "dl", "blockquote"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip: list[str] = []  # open tags inside a skipped element, the skipped one first
        self._pre = 0

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if self._skip:
            if tag == self._skip[0]:
                self._skip.append(tag)
            return
        classes = set((attrs.get("class") or "").split())
        if tag in self.SKIP_TAGS or classes & self.SKIP_CLASSES or attrs.get("role") == "navigation":
            self._skip.append(tag)
            return
        if tag == "pre":
            self._pre += 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if self._skip:
            if tag == self._skip[0]:
                self._skip.pop()
            return
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag in self.BLOCKS:
            self.parts.append("\n")

    def handle_data(self, data):
        if self._skip:
            return
        if not self._pre:
            data = re.sub(r"\s+", " ", data)
            if not self.parts or self.parts[-1].endswith("\n"):
                data = data.lstrip()
        self.parts.append(data)


def html_to_text(markup: str) -> str:
    parser = _HTMLText()
    parser.feed(markup)
    parser.close()
    text = "".join(parser.parts).replace("\u00b6", "")  # Sphinx's pilcrow anchors
    text = re.sub(r"[ \t]+\n", "\n", text)
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def read_text(path: Path) -> str:
    text = path.read_text(encoding="utf-8", errors="replace")
    return html_to_text(text) if path.suffix.lower() in (".html", ".htm") else text


def corpus_files(sources: Sequence[str | Path]) -> list[Path]:
    """Files named directly, plus every text-like file (TEXT_SUFFIXES) under named directories."""
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)
        elif path.is_file():
            files.append(path)
        else:
            raise ValueError(f"corpus source {source} is neither a file nor a directory")
    if not files:
        raise ValueError(f"no text files ({', '.join(TEXT_SUFFIXES)}) found in {', '.join(map(str, sources))}")
    return files


# --- CLI ----------------------------------------------------------------------------------

def add_parser(subparsers) -> None:
    """Add `datastore build` to verispec's argparse subcommands."""
    p = subparsers.add_parser("datastore", help="build token datastores for the retrieval method")
    dsub = p.add_subparsers(dest="datastore_cmd", required=True)
    b = dsub.add_parser("build", help="tokenise text files (and optionally the model's own generations) into a datastore")
    b.add_argument("--model", required=True, help="zoo name or local Hugging Face directory (its tokenizer is used)")
    b.add_argument("--from", dest="sources", nargs="+", required=True, metavar="FILE",
                   help=f"text files or directories (searched for {', '.join(TEXT_SUFFIXES)}; HTML is stripped)")
    b.add_argument("--out", required=True, help="directory to write the datastore to")
    b.add_argument("--generate", type=int, default=0, metavar="N",
                   help="also add the model's greedy continuations of N prompts taken from the files")
    b.add_argument("--generate-tokens", type=int, default=128, help="new tokens per generated continuation")
    b.add_argument("--prompt-tokens", type=int, default=48, help="tokens of file text that start each generation")
    b.add_argument("--chat", action="store_true", help="wrap the generation prompts in the chat template")
    b.add_argument("--sort-depth", type=int, default=DEFAULT_SORT_DEPTH,
                   help="longest context suffix a lookup can match")
    b.add_argument("--dtype", default="auto")
    b.add_argument("--device", default="auto")
    b.set_defaults(func=cmd_build)


def cmd_build(args) -> int:
    started = time.perf_counter()
    files = corpus_files(args.sources)
    lm = load_model(args.model, dtype=args.dtype, device=args.device)
    if lm.tokenizer is None:
        raise ValueError(f"model {args.model!r} has no tokenizer, so text files cannot be tokenised for it")
    info: dict[str, Any] = {"model": lm.name, "sources": [str(s) for s in args.sources], "n_files": len(files)}
    t0 = time.perf_counter()
    documents = tokenize_files(lm.tokenizer, files)
    info["tokenize_seconds"] = round(time.perf_counter() - t0, 2)
    if args.generate > 0:
        t0 = time.perf_counter()
        generated = generate_documents(lm, documents, args.generate, args.prompt_tokens, args.generate_tokens, args.chat)
        info["generated"] = {"prompts": args.generate, "new_tokens": args.generate_tokens, "chat": args.chat,
                             "tokens": int(sum(len(g) for g in generated)),
                             "seconds": round(time.perf_counter() - t0, 2)}
        documents += generated
    say(f"indexing {sum(len(d) for d in documents):,} tokens ...", "verispec datastore")
    store = build_datastore(documents, args.out, tokenizer_identity(lm), args.sort_depth, progress=True, **info)
    size = sum((store.path / f).stat().st_size for f in (HEADER_FILE, TOKENS_FILE, INDEX_FILE))
    print(f"datastore {store.path}: {store.header['n_tokens']:,} tokens from {store.header['n_documents']:,} documents, "
          f"{size / 2**20:.1f} MiB, built in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0


def tokenize_files(tokenizer, files: Sequence[Path], batch: int = 32) -> list[list[int]]:
    documents: list[list[int]] = []
    for i in _progress(range(0, len(files), batch), True, f"tokenising {len(files)} files"):
        texts = [t for t in (read_text(f) for f in files[i:i + batch]) if t.strip()]
        if texts:
            documents += tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
    return documents


def generate_documents(lm, documents: list[list[int]], n: int, prompt_tokens: int, new_tokens: int,
                       chat: bool) -> list[list[int]]:
    """The model's greedy continuations of n prompts cut from evenly spaced documents."""
    usable = [d for d in documents if len(d) >= prompt_tokens]
    if not usable:
        raise ValueError(f"--generate needs documents of at least {prompt_tokens} tokens")
    picks = [usable[(i * len(usable)) // n] for i in range(n)]
    out = []
    for doc in _progress(picks, True, "generating"):
        prompt = doc[:prompt_tokens]
        if chat:
            prompt = lm.encode(lm.decode(prompt), chat=True)
        ids = torch.tensor([prompt], device=lm.device)
        with torch.inference_mode():
            gen = lm.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                                    do_sample=False, pad_token_id=lm.tokenizer.pad_token_id or 0)
        new = gen[0, len(prompt):].tolist()
        out.append(new if chat else prompt + new)  # a chat template's tokens are no corpus text
    return out


def _progress(items, show: bool, desc: str):
    return progress_bar(items, desc, enabled=show, leave=False)
