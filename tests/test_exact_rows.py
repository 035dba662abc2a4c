"""exact_rows: exact mode's attention arithmetic. A row's output is bit for bit the same whatever
shares its call, whichever slot it takes, and whatever the keys it does not see hold; the plan
covers every row once, in calls of one padded key count."""
from __future__ import annotations

import pytest
import torch

from verispec.engine import exact_rows
from verispec.engine.exact_rows import KEY_BLOCK, attend, padded_keys, plan, rows_per_call

pytestmark = pytest.mark.usefixtures("one_thread")


def qkv(gen, heads, kv_heads, rows, keys, dim):
    q = torch.randn(1, heads, rows, dim, generator=gen).to(torch.bfloat16)
    k, v = (torch.randn(1, kv_heads, keys, dim, generator=gen).to(torch.bfloat16) for _ in range(2))
    return q, k, v


@pytest.mark.parametrize("heads,kv_heads,dim", [(4, 4, 32), (9, 3, 64), (8, 2, 64), (12, 2, 128)])
def test_a_rows_output_does_not_depend_on_its_companions_or_slot(heads, kv_heads, dim):
    gen = torch.Generator().manual_seed(heads)
    rows = rows_per_call(heads // kv_heads)
    for last in (KEY_BLOCK - 1, KEY_BLOCK + rows - 2, 3 * KEY_BLOCK, 5 * KEY_BLOCK - 2):
        lengths = [last - i for i in range(rows) if padded_keys(last - i) == padded_keys(last)]
        q, k, v = qkv(gen, heads, kv_heads, len(lengths), last + 7, dim)  # keys past every row's length
        together = attend(q, k, v, lengths, dim ** -0.5)
        for i, n in enumerate(lengths):
            alone = attend(q[:, :, i:i + 1], k[:, :, :n], v[:, :, :n], [n], dim ** -0.5)
            assert torch.equal(together[:, i], alone[:, 0]), (last, i)
        flipped = attend(q.flip(2), k, v, lengths[::-1], dim ** -0.5)  # every row in another slot
        assert torch.equal(flipped.flip(1), together)


def test_the_keys_a_row_does_not_see_are_inert_and_the_result_is_attention():
    gen = torch.Generator().manual_seed(5)
    q, k, v = qkv(gen, 4, 2, 2, 100, 64)  # two query heads per key head: two rows a call
    out = attend(q, k, v, [70, 71], 0.125)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 71:], v2[:, :, 71:] = 1e4, -1e4  # what the rows do not see
    assert torch.equal(attend(q, k2, v2, [70, 71], 0.125), out)
    for i, n in enumerate((70, 71)):  # float64 reference, grouped-query heads as the model maps them
        kk = k[0, :, :n].double().repeat_interleave(2, 0)
        vv = v[0, :, :n].double().repeat_interleave(2, 0)
        want = torch.softmax(q[0, :, i].double()[:, None] @ kk.transpose(1, 2) * 0.125, -1) @ vv
        assert torch.allclose(out[0, i].double(), want[:, 0], atol=1e-5)


def test_a_call_refuses_rows_of_two_padded_key_counts():
    q, k, v = qkv(torch.Generator().manual_seed(6), 4, 4, 2, 200, 32)
    with pytest.raises(ValueError, match="padded key count"):
        attend(q, k, v, [KEY_BLOCK, KEY_BLOCK + 1], 1.0)


def test_a_chain_pass_plans_calls_of_so_many_rows_on_one_padded_key_count():
    q_len, kv_len, rows_each = 11, KEY_BLOCK + 6, 4  # rows see 60..70 keys: across a block boundary
    calls = plan(None, q_len, kv_len, rows_each)
    covered = sorted(r for rows, _, _ in calls for r in rows)
    assert covered == list(range(q_len))
    for rows, keys, lengths in calls:
        assert len(rows) <= rows_each and isinstance(keys, int) and keys == max(lengths)
        assert lengths == [kv_len - q_len + r + 1 for r in rows]
        assert len({padded_keys(n) for n in lengths}) == 1
    assert len(calls) == 4  # 4 rows below the boundary (one call), 7 above it (two)
    assert plan(None, 1, 300, rows_each) == [([0], 300, [300])]  # a decode: one call over the cache


def test_a_tree_pass_plans_one_gather_per_root_to_leaf_path():
    context = 50
    parents = (-1, 0, 1, 2, 0, 4)  # paths 0-1-2-3 (in cache order: a prefix) and 0-4-5
    visible = []
    for node in range(len(parents)):
        path, at = [], node
        while at >= 0:
            path.append(context + at)
            at = parents[at]
        visible.append(tuple(range(context)) + tuple(sorted(path)))
    calls = plan(visible, len(parents), context + len(parents), 4)
    assert sorted(r for rows, _, _ in calls for r in rows) == list(range(len(parents)))
    for rows, keys, lengths in calls:
        sequence = list(range(keys)) if isinstance(keys, int) else keys.tolist()
        for r, n in zip(rows, lengths):
            assert tuple(sequence[:n]) == visible[r]  # the row's keys, in cache order
    assert len(calls) == 2  # the cache prefix of 0-1-2-3 (a view) and one gather for 4, 5
    assert any(isinstance(keys, int) for _, keys, _ in calls)


def test_buffers_are_reused_per_call_shape_and_thread():
    import threading

    mine = exact_rows._buffers(2, 1, 6, 320, 128)
    assert exact_rows._buffers(2, 1, 6, 320, 128)[1] is mine[1]
    other = []
    thread = threading.Thread(target=lambda: other.append(exact_rows._buffers(2, 1, 6, 320, 128)))
    thread.start()
    thread.join()
    assert other[0][1] is not mine[1]


def test_calls_hold_about_eight_query_head_rows():
    assert [rows_per_call(g) for g in (1, 3, 4, 6, 7, 9)] == [8, 2, 2, 1, 1, 1]
