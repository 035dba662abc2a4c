"""Exact mode's attention arithmetic: every query row computed by a call of one fixed shape.

A row's attention output must not depend on which other rows share its pass, or a verified
token's logits would differ from its one-token decode. The argument here is structural, not a
probe of one machine's kernels: every call, a one-token decode included, has the same shapes
for a given key count, and a row's result depends only on its own numbers.

- Queries: a call takes `rows_per_call(group)` query tokens (a decode's one row, the rest zero),
  as [key heads, rows * group, head dim] float32 (group: query heads per key head). A GEMM's output row depends on
  its input row and the shapes only, so the padding rows are inert and a token's row is the same
  whichever slot it has and whatever shares the call.
- Keys: a row sees `n` keys, in the order its decode's cache holds them (the context, then its
  ancestors). The call holds them zero-padded to `padded_keys(n)` (a multiple of `KEY_BLOCK`), and
  an additive mask of -inf hides the keys past each row's own `n`, so a row's scores, softmax and
  weighted sum are the same products over the same padded length in decoding and verification:
  what a hidden key contributes is an exact zero (softmax gives 0 for -inf; 0 * v adds nothing).
- Rows of one call must share that key sequence up to their own length: the rows of a chain (each
  sees a prefix of the cache), or of one root-to-leaf path of a tree (its keys gathered once).

Scores, softmax and sum are float32 (as PyTorch's flash kernel computes them), so this is no
less accurate than the model's own attention. Cost: a decode computes `rows` rows for one; a
verification pass over n rows makes about n / rows calls instead of n (`plan`).
"""
from __future__ import annotations

import threading
from functools import lru_cache

import torch

QUERY_ROWS = 8  # query-head rows per key head a call holds. Measured (scripts/exact_rows_cost.py,
# AVX2, 2 threads, smollm2, context 300; README, stop 19): at 12 (4 tokens a call) a decode pass
# cost 1.06x the one-call-per-row one; at 8 (2 tokens) 0.96x, with 8-row passes 0.88x.
KEY_BLOCK = 64  # key counts are padded to multiples of this: a call's shapes change every 64 tokens


def rows_per_call(group: int) -> int:
    """Query tokens per call for a model with `group` query heads per key head (>= 1)."""
    return max(1, QUERY_ROWS // group)


def padded_keys(n: int) -> int:
    return -(-n // KEY_BLOCK) * KEY_BLOCK


def attend(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, lengths: list[int],
           scale: float) -> torch.Tensor:
    """One call. query [1, H, m, D] with m <= rows_per_call(H / Hkv) rows; key/value
    [1, Hkv, >= max(lengths), D], row i seeing key[:, :, :lengths[i]]; every length with the same padded_keys. Returns a float32
    [1, m, H, D] view (the caller's copy into its output casts it)."""
    _, heads, m, dim = query.shape
    kv_heads = key.shape[1]
    group = heads // kv_heads
    rows = rows_per_call(group)
    width = padded_keys(lengths[-1] if m == 1 else max(lengths))
    if m > 1 and (m > rows or padded_keys(min(lengths)) != width):
        raise ValueError(f"a call takes at most {rows} rows of one padded key count, got lengths {lengths}")
    q, k, v = _buffers(kv_heads, rows, group, width, dim)
    seen = min(key.shape[2], width)
    # narrow/copy_ rather than slice assignment: a decode step makes these calls in every layer
    q.narrow(1, 0, m).copy_(query[0].view(kv_heads, group, m, dim).transpose(1, 2))
    k.narrow(1, 0, seen).copy_(key[0].narrow(1, 0, seen))
    v.narrow(1, 0, seen).copy_(value[0].narrow(1, 0, seen))
    scores = torch.baddbmm(_hidden(tuple(lengths), rows, group, width), q.view(kv_heads, rows * group, dim),
                           k.transpose(1, 2), alpha=scale)
    out = torch.bmm(scores.softmax(dim=-1), v).view(kv_heads, rows, group, dim).narrow(1, 0, m)
    return out.permute(1, 0, 2, 3).reshape(1, m, heads, dim)


_local = threading.local()  # the buffers are written by every call: one set per thread


def _buffers(kv_heads: int, rows: int, group: int, width: int, dim: int) -> tuple[torch.Tensor, ...]:
    """float32 query, key and value buffers of one call shape, reused (a decode step would
    otherwise allocate and zero three per layer). What a call does not overwrite is inert: the
    other query slots' rows (a GEMM's output row reads only its own input row) and the keys past
    its rows' lengths (masked: they need only be finite, and are: zeros, or keys of an earlier
    call). A few shapes are kept per thread (the key width moves every KEY_BLOCK tokens)."""
    kept = _local.__dict__.setdefault("buffers", {})
    shape = (kv_heads, rows, group, width, dim)
    if shape not in kept:
        if len(kept) >= 8:
            kept.pop(next(iter(kept)))
        kept[shape] = (torch.zeros(kv_heads, rows, group, dim), torch.zeros(kv_heads, width, dim),
                       torch.zeros(kv_heads, width, dim))
    return kept[shape]


@lru_cache(maxsize=256)
def _hidden(lengths: tuple[int, ...], rows: int, group: int, width: int) -> torch.Tensor:
    """[1, rows * group, width]: 0 where a row's key is visible, -inf past its length; a padding
    row sees key 0 (it must see something, or its softmax is NaN). Every layer of a pass, and
    the last decode step's layers, ask for the same one."""
    seen = torch.tensor([*lengths, *[1] * (rows - len(lengths))])
    hidden = torch.arange(width) >= seen[:, None]  # [rows, width]
    mask = torch.zeros(rows, group, width).masked_fill_(hidden[:, None], float("-inf"))
    return mask.view(1, rows * group, width)


def plan(visible: list[tuple[int, ...]] | None, q_len: int, kv_len: int,
         rows: int) -> list[tuple[list[int], object, list[int]]]:
    """How a pass's rows are called: a list of (rows, keys, lengths), keys an int n (the cache
    prefix [0, n): a view, as decoding reads it) or an index tensor (a path's keys in cache
    order). visible: per row, the key indices it sees, ascending; None for a causal pass (row r
    sees the cache's first kv_len - q_len + r + 1 keys); rows: query tokens per call."""
    if visible is None:
        past = kv_len - q_len
        return _chunks([(r, past + r + 1) for r in range(q_len)], kv_len, rows)
    calls = []
    for path, members in _paths(visible):
        if path == tuple(range(len(path))):
            calls += _chunks(members, len(path), rows)
        else:
            index = torch.tensor(path)
            calls += [(r, index[:max(n)], n) for r, _, n in _chunks(members, len(path), rows)]
    return calls


def _paths(visible: list[tuple[int, ...]]) -> list[tuple[tuple[int, ...], list[tuple[int, int]]]]:
    """Group rows whose key sequences are prefixes of one another: (the longest sequence, its
    rows as (row, length)). Longest first, so each row joins the path of a descendant."""
    paths: list[tuple[tuple[int, ...], list[tuple[int, int]]]] = []
    for r in sorted(range(len(visible)), key=lambda r: -len(visible[r])):
        keys, n = visible[r], len(visible[r])
        for path, rows in paths:
            if path[n - 1] == keys[-1] and path[:n] == keys:
                rows.append((r, n))
                break
        else:
            paths.append((keys, [(r, n)]))
    return paths


def _chunks(members: list[tuple[int, int]], keys: int, rows: int) -> list[tuple[list[int], int, list[int]]]:
    """(row, length) pairs of one key sequence in calls of at most `rows` rows with one padded
    key count each."""
    calls: list[tuple[list[int], int, list[int]]] = []
    for r, n in sorted(members, key=lambda row: row[1]):
        if calls and len(calls[-1][0]) < rows and padded_keys(calls[-1][2][0]) == padded_keys(n):
            calls[-1][0].append(r)
            calls[-1][2].append(n)
        else:
            calls.append(([r], keys, [n]))
    return [(r, min(keys, max(n)), n) for r, keys, n in calls]
