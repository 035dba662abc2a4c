"""Why row i of an n-token bf16 forward pass differs from the same token in a one-token pass.

Prefills a random context into a DynamicCache, then runs the same n tokens two ways on copies
of that cache: "decode" (n one-token passes) and "verify" (one n-token pass). Forward hooks on
every submodule (plus ``self_attn.core``: the attention output as o_proj receives it) compare
the two row by row, in execution order, and the first op whose rows differ is marked ``<<<``.

On CPU (AVX2, torch 2.x) the first difference is in the attention core: the SDPA flash kernel
runs its two products (Q.K^T and P.V) through MKL's ``cblas_gemm_bf16bf16f32`` with N = number
of query rows, and MKL's fp32 result for a column depends on N (and, with a mask, the extra
masked keys can change it too). nn.Linear (ATen's own bf16 gemm, no MKL) is row-invariant for
the contiguous inputs HF passes it; an fp32 matmul (MKL sgemm) is not. ``--isolate`` shows
each of these facts on its own.

``--fix`` monkeypatches (in this process only) a candidate remedy; ``--sweep`` checks whether
verify logits are then bit-identical to decode logits for several n and context lengths, and
``--time`` prints the median cost of a 1-token and a 4-token pass.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 .venv/bin/python scripts/bf16_rows.py \\
        --model smollm2-135m-instruct --context 200 --rows 4 [--fix rowwise_attn] \\
        [--sweep] [--time] [--isolate]
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import ctypes
import os
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import AttentionInterface, DynamicCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from verispec.models import load_model

# --------------------------------------------------------------------------- comparison


def ulp_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest |a - b| in units of the dtype's spacing at max(|a|, |b|) (1 = one last-place step)."""
    eps = torch.finfo(a.dtype).eps  # 2**-7 for bfloat16
    a, b = a.double(), b.double()
    _, e = torch.frexp(torch.maximum(a.abs(), b.abs()))
    return float(((a - b).abs() / (eps * torch.ldexp(torch.ones_like(a), e - 1))).max())


class Recorder:
    """Records every submodule's output (and o_proj's input, as ``self_attn.core``) per call."""

    def __init__(self, model: nn.Module):
        self.calls: dict[str, list[torch.Tensor]] = {}
        self.handles = []
        for name, mod in model.named_modules():
            if not name or name.count(".") == 0:  # skip the wrappers returning ModelOutputs
                continue
            self.handles.append(mod.register_forward_hook(self._out(name)))
            if name.endswith("self_attn.o_proj"):
                core = name.replace("o_proj", "core")
                self.handles.append(mod.register_forward_pre_hook(self._in(core)))

    def _store(self, name: str, t) -> None:
        if torch.is_tensor(t) and t.dim() == 3:
            self.calls.setdefault(name, []).append(t.detach().clone())

    def _out(self, name):
        return lambda mod, args, out: self._store(name, out[0] if isinstance(out, tuple) else out)

    def _in(self, name):
        return lambda mod, args: self._store(name, args[0])

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def prefill(model, ids: torch.Tensor, context: int) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids[:, :context], cache=cache, use_cache=True)
    return cache


def run(model, cache0, ids, context, chunks) -> torch.Tensor:
    """Feeds ids[context+a : context+b] for each (a, b) on a copy of cache0; returns all logits."""
    cache, logits = copy.deepcopy(cache0), []
    with torch.no_grad():
        for a, b in chunks:
            out = model(ids[:, context + a : context + b], cache=cache, use_cache=True)
            logits.append(out.logits[0])
    return torch.cat(logits)


def decode_and_verify(model, cache0, ids, context, n):
    dec = run(model, cache0, ids, context, [(i, i + 1) for i in range(n)])
    ver = run(model, cache0, ids, context, [(0, n)])
    return dec, ver


def op_table(model, cache0, ids, context, n) -> None:
    rec = Recorder(model)
    run(model, cache0, ids, context, [(i, i + 1) for i in range(n)])
    dec = {k: list(v) for k, v in rec.calls.items()}
    rec.calls.clear()
    run(model, cache0, ids, context, [(0, n)])
    ver = rec.calls
    rec.close()
    first = None
    print(f"{'op':44s} " + " ".join(f"{'row ' + str(r):>12s}" for r in range(n)))
    for name, (v,) in ver.items():
        cells = []
        for r in range(n):
            d = dec[name][r][0, -1]
            cells.append("equal" if torch.equal(d, v[0, r]) else f"{ulp_diff(d, v[0, r]):.0f} ulp")
        mark = ""
        if first is None and any(c != "equal" for c in cells):
            first, mark = name, "  <<< first difference"
        print(f"{name:44s} " + " ".join(f"{c:>12s}" for c in cells) + mark)
    print(f"first differing op: {first or 'none (all rows bit-equal)'}")


# --------------------------------------------------------------------------- candidate fixes


def _pad_rows(x: torch.Tensor, m: int) -> torch.Tensor:
    return torch.cat([x, x.new_zeros(m - x.shape[0], x.shape[1])]) if x.shape[0] < m else x


@contextlib.contextmanager
def patch_linear(fn):
    orig = nn.Linear.forward
    nn.Linear.forward = fn
    try:
        yield
    finally:
        nn.Linear.forward = orig


@contextlib.contextmanager
def patch_sdpa(fn):
    AttentionInterface.register("sdpa", fn)
    try:
        yield
    finally:
        AttentionInterface.register("sdpa", sdpa_attention_forward)


def linear_contig(self, x):
    """2D contiguous input to every Linear."""
    return F.linear(x.reshape(-1, x.shape[-1]).contiguous(), self.weight, self.bias).view(*x.shape[:-1], -1)


def linear_pad8(self, x):
    """Every Linear computed on a multiple of 8 rows (zero padded)."""
    x2 = x.reshape(-1, x.shape[-1])
    m = -(-x2.shape[0] // 8) * 8
    return F.linear(_pad_rows(x2, m), self.weight, self.bias)[: x2.shape[0]].view(*x.shape[:-1], -1)


def linear_fp32(self, x):
    """fp32 matmul (MKL sgemm) on fp32 copies of the weights, rounded to bf16 once."""
    if getattr(self, "_w32", None) is None:
        self._w32 = self.weight.float().t().contiguous()
        self._b32 = None if self.bias is None else self.bias.float()
    y = x.float() @ self._w32
    return (y if self._b32 is None else y + self._b32).to(x.dtype)


def rowwise_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """Attention one query row at a time, each on exactly the keys it may see (a decode call)."""
    q_len = query.shape[2]
    if q_len == 1:
        return sdpa_attention_forward(module, query, key, value, attention_mask, *args, **kwargs)
    outs = []
    for r in range(q_len):
        if attention_mask is None:
            kv, mask = key.shape[2] - q_len + r + 1, None
        else:  # batch 1: cut the keys after this row's last visible one
            row = attention_mask[:, :, r : r + 1]
            seen = row if row.dtype == torch.bool else row > torch.finfo(row.dtype).min / 2
            kv = int(seen[0, 0, 0].nonzero().max()) + 1
            mask = None if bool(seen[..., :kv].all()) else row[..., :kv]
        o, _ = sdpa_attention_forward(module, query[:, :, r : r + 1], key[:, :, :kv], value[:, :, :kv],
                                      mask, *args, **kwargs)
        outs.append(o)
    return torch.cat(outs, 1), None


def padq8_sdpa(module, query, key, value, attention_mask, *args, **kwargs):
    """Attention always on blocks of exactly 8 query rows (zero padded), always with a bool mask."""
    b, h, q_len, d = query.shape
    kv = key.shape[2]
    if attention_mask is None:
        attention_mask = torch.ones(q_len, kv, dtype=torch.bool).tril(kv - q_len)[None, None]
    outs = []
    for s in range(0, q_len, 8):
        q = query[:, :, s : s + 8]
        m = attention_mask[:, :, s : s + 8]
        pad = 8 - q.shape[2]
        if pad:
            q = torch.cat([q, q.new_zeros(b, h, pad, d)], 2)
            m = torch.cat([m, m.new_ones(*m.shape[:2], pad, kv)], 2)
        o, _ = sdpa_attention_forward(module, q, key, value, m, *args, **kwargs)
        outs.append(o[:, : 8 - pad])
    return torch.cat(outs, 1), None


FIXES = {
    "none": contextlib.nullcontext,
    "contig_linear": lambda: patch_linear(linear_contig),
    "pad8_linear": lambda: patch_linear(linear_pad8),
    "fp32_linear": lambda: patch_linear(linear_fp32),
    "math_sdpa": lambda: sdpa_kernel(SDPBackend.MATH),
    "rowwise_attn": lambda: patch_sdpa(rowwise_sdpa),
    "padq8_attn": lambda: patch_sdpa(padq8_sdpa),
}


def sweep(model, vocab: int, rows=(2, 3, 4, 8, 12), contexts=(30, 200, 1000)) -> None:
    print("verify logits == decode logits (bit-identical rows / rows):")
    for c in contexts:
        ids = torch.randint(100, vocab, (1, c + max(rows)), generator=torch.Generator().manual_seed(c))
        cache0 = prefill(model, ids, c)
        cells = []
        for n in rows:
            dec, ver = decode_and_verify(model, cache0, ids, c, n)
            same = sum(torch.equal(dec[r], ver[r]) for r in range(n))
            cells.append(f"n={n}: {same}/{n}" + ("" if same == n else " x"))
        print(f"  context {c:5d}: " + ", ".join(cells))


def timing(model, vocab: int, context=200, repeats=15) -> None:
    ids = torch.randint(100, vocab, (1, context + 4), generator=torch.Generator().manual_seed(1))
    cache0 = prefill(model, ids, context)
    res = []
    for n in (1, 4):
        samples = []
        for i in range(repeats + 2):
            cache = copy.deepcopy(cache0)
            with torch.no_grad():
                t = time.perf_counter()
                model(ids[:, context : context + n], cache=cache, use_cache=True)
                samples.append(time.perf_counter() - t)
        res.append(statistics.median(samples[2:]) * 1000)
    print(f"median ms per pass (context {context}, {torch.get_num_threads()} thread): "
          f"M=1 {res[0]:.1f}, M=4 {res[1]:.1f}")


# --------------------------------------------------------------------------- isolated kernels


def _mkl_bf16_gemm():
    lib = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
    f = lib.cblas_gemm_bf16bf16f32  # what the CPU flash-attention kernel calls for bf16
    f.argtypes = [ctypes.c_int] * 6 + [ctypes.c_float, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                                       ctypes.c_int, ctypes.c_float, ctypes.c_void_p, ctypes.c_int]

    def gemm(trans_a: bool, m, n, k, a, lda, b, ldb):  # column-major, C = op(A) @ B, fp32 out
        c = torch.zeros(n, m)
        f(102, 112 if trans_a else 111, 111, m, n, k, 1.0, a.data_ptr(), lda, b.data_ptr(), ldb, 0.0,
          c.data_ptr(), m)
        return c

    return gemm


def isolate(model, ms=(2, 3, 4, 8, 12), trials=10) -> None:
    torch.manual_seed(0)  # nn.Linear init below
    g = torch.Generator().manual_seed(0)
    shapes = sorted({(m.in_features, m.out_features, m.bias is not None)
                     for m in model.modules() if isinstance(m, nn.Linear)})
    print("F.linear, bf16: rows of an M-row call that differ from the 1-row call")
    for k, n_out, bias in shapes:
        lin = nn.Linear(k, n_out, bias=bias).bfloat16()
        x = torch.randn(1, 12, k, generator=g).bfloat16()
        with torch.no_grad():
            ref = [lin(x[:, r : r + 1]) for r in range(12)]
            bad2d = sum(not torch.equal(lin(x[0, :m])[r], ref[r][0, 0]) for m in ms for r in range(m))
            bad3d = sum(not torch.equal(lin(x[:, :m])[0, r], ref[r][0, 0]) for m in ms for r in range(m))
            xt = x[0, :8].t().contiguous().t()  # non-contiguous
            badnc = sum(not torch.equal(lin(xt)[r], ref[r][0, 0]) for r in range(8))
            bad32 = sum(not torch.equal(linear_fp32(lin, x[0, :m])[r], linear_fp32(lin, x[0, r : r + 1])[0])
                        for m in ms for r in range(m))
        tot = sum(ms)
        print(f"  {k:5d} -> {n_out:6d} bias={bias!s:5s}: 2D {bad2d}/{tot}, 3D {bad3d}/{tot}, "
              f"non-contig {badnc}/8;  fp32 matmul (sgemm) {bad32}/{tot}")
    gemm = _mkl_bf16_gemm()
    print("MKL cblas_gemm_bf16bf16f32 (fp32 out): columns of an N-column call that differ from N=1")
    for kv in (31, 204, 1004):
        qk = {n: 0 for n in (2, 4, 8)}
        pv = dict(qk)
        for _ in range(trials):
            kmat, vmat = (torch.randn(kv, 64, generator=g).bfloat16() for _ in range(2))
            q, p = torch.randn(8, 64, generator=g).bfloat16(), torch.rand(8, kv, generator=g).bfloat16()
            for n in qk:
                c1 = gemm(True, kv, n, 64, kmat, 64, q[:n].contiguous(), 64)
                c2 = gemm(False, 64, n, kv, vmat, 64, p[:n].contiguous(), kv)
                for j in range(n):
                    qk[n] += not torch.equal(c1[j], gemm(True, kv, 1, 64, kmat, 64, q[j : j + 1].contiguous(), 64)[0])
                    pv[n] += not torch.equal(c2[j], gemm(False, 64, 1, kv, vmat, 64, p[j : j + 1].contiguous(), kv)[0])
        print(f"  kv {kv:5d}: Q.K^T " + ", ".join(f"N={n} {qk[n]}/{trials * n}" for n in qk)
              + ";  P.V " + ", ".join(f"N={n} {pv[n]}/{trials * n}" for n in pv))
    print("SDPA (bf16, flash CPU kernel), row r of q_len n vs a q_len-1 call on the keys row r sees:")
    h = model.config.num_attention_heads
    for kv0 in (30, 200, 1000):
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
            bad = tot = 0
            for _ in range(trials):
                n = 4
                q = torch.randn(1, h, n, 64, generator=g).bfloat16()
                k, v = (torch.randn(1, h, kv0 + n, 64, generator=g).bfloat16() for _ in range(2))
                mask = torch.ones(n, kv0 + n, dtype=torch.bool).tril(kv0)[None, None]
                with sdpa_kernel(backend):
                    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                    for r in range(n):
                        o1 = F.scaled_dot_product_attention(q[:, :, r : r + 1], k[:, :, : kv0 + r + 1],
                                                            v[:, :, : kv0 + r + 1])
                        bad += not torch.equal(o[:, :, r : r + 1], o1)
                        tot += 1
            print(f"  context {kv0:5d}, {backend.name:15s}: {bad}/{tot} rows differ")
    print("SDPA flash, q_len 1: keys [0, kv) vs the same keys plus e masked-out keys (bool mask)")
    for kv in (31, 201, 1001):
        bad = {e: 0 for e in (1, 3, 7, 8)}
        for _ in range(trials):
            q = torch.randn(1, h, 1, 64, generator=g).bfloat16()
            k, v = (torch.randn(1, h, kv + 8, 64, generator=g).bfloat16() for _ in range(2))
            ref = F.scaled_dot_product_attention(q, k[:, :, :kv], v[:, :, :kv])
            for e in bad:
                mask = (torch.arange(kv + e) < kv)[None, None, None]
                o = F.scaled_dot_product_attention(q, k[:, :, : kv + e], v[:, :, : kv + e], attn_mask=mask)
                bad[e] += not torch.equal(o, ref)
        print(f"  kv {kv:5d}: " + ", ".join(f"+{e} masked {bad[e]}/{trials}" for e in bad))


# --------------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--fix", default="none", help="comma-separated: " + ", ".join(FIXES))
    ap.add_argument("--sweep", action="store_true", help="logits check over n in 2,3,4,8,12 and contexts 30,200,1000")
    ap.add_argument("--time", action="store_true", help="median ms of a 1-token and a 4-token pass")
    ap.add_argument("--isolate", action="store_true", help="test the kernels on their own")
    ap.add_argument("--no-ops", action="store_true", help="skip the per-op table")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    model = load_model(args.model, dtype=args.dtype).model
    vocab = min(model.config.vocab_size, 5000)
    print(f"{args.model} {args.dtype}, attn={model.config._attn_implementation}, fix={args.fix}, "
          f"cpu={torch.backends.cpu.get_cpu_capability()}, threads={torch.get_num_threads()}")
    if args.isolate:
        isolate(model)
    with contextlib.ExitStack() as stack:
        for fix in args.fix.split(","):
            stack.enter_context(FIXES[fix]())
        if not args.no_ops:
            ids = torch.randint(100, vocab, (1, args.context + args.rows), generator=torch.Generator().manual_seed(0))
            op_table(model, prefill(model, ids, args.context), ids, args.context, args.rows)
        if args.sweep:
            sweep(model, vocab)
        if args.time:
            timing(model, vocab)


if __name__ == "__main__":
    main()
