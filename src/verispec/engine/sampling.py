"""Logits -> probabilities, in one place for the target (p) and the draft (q).

Both sides must go through the same transform, otherwise speculative sampling would
reproduce a different distribution from the one plain sampling draws from.
"""
from __future__ import annotations

import functools

import torch

from ..config import SamplingConfig


def probabilities(logits: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Softmax of logits [..., vocab] after temperature, top-k and top-p, in float32.

    Greedy (temperature 0) gives a one-hot distribution on the argmax, so greedy is the
    temperature -> 0 limit of sampling and every rule can treat it the same way.
    """
    logits = logits.float()
    if sampling.greedy:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    logits = logits / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = torch.topk(logits, sampling.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if sampling.top_p < 1.0:
        probs = _nucleus(probs, sampling.top_p)
    return probs


def _nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose mass reaches top_p, renormalised."""
    sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
    kept = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return kept / kept.sum(-1, keepdim=True)


def sample(probs: torch.Tensor, rng: torch.Generator | None) -> int:
    """Draw one token id from a 1-D distribution."""
    return int(torch.multinomial(probs, 1, generator=rng).item())


# --------------------------------------------------------------------------- coupled (Gumbel-max) sampling
#
# Gumbel-max: argmax_v(log p(v) + g(v)) with g standard Gumbel noise is a draw from p. When the
# noise of the token at sequence index i is a fixed function of (seed, i), every token is still a
# draw from the target's distribution given what came before (the noise of index i is independent
# of the noise that chose the earlier tokens), and the draw no longer depends on how the token was
# reached: `ar` and any speculative method emit the same tokens for a seed. A drafter that draws
# with the same noise guesses the target's pick as often as its distribution allows.

def gumbel_noise(seed: int, index: int, vocab: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard Gumbel noise [vocab] (float64) of sequence index `index` under `seed`. Drawn on the
    CPU from a generator seeded by (seed, index), so it is the same on every device."""
    return _gumbel_cpu(int(seed), int(index), int(vocab)).to(device)


@functools.lru_cache(maxsize=32)  # a step reads each index's noise several times (target, draft, tree levels)
def _gumbel_cpu(seed: int, index: int, vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(_mix64(seed, index))
    u = torch.rand(vocab, generator=gen, dtype=torch.float64).clamp_min(1e-300)  # [0, 1): keep log finite
    return -torch.log(-torch.log(u))


def _mix64(seed: int, index: int) -> int:
    """splitmix64 of (seed, index): one well-spread 64-bit generator seed per pair."""
    mask = (1 << 64) - 1
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xBF58476D1CE4E5B9 + 0x94D049BB133111EB) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def gumbel_scores(probs: torch.Tensor, seed: int, index: int) -> torch.Tensor:
    """log p + g for the token at sequence index `index` (float64; -inf where p is 0)."""
    return probs.double().log() + gumbel_noise(seed, index, probs.shape[-1], probs.device)


def gumbel_pick(probs: torch.Tensor, seed: int, index: int) -> int:
    """The coupled draw from a 1-D distribution for sequence index `index`."""
    return int(gumbel_scores(probs, seed, index).argmax())


def draw(probs: torch.Tensor, sampling: SamplingConfig, rng: torch.Generator | None, index: int) -> int:
    """One token from `probs` for sequence index `index`: the coupled Gumbel-max draw when
    sampling.coupled, else an independent draw from rng."""
    if sampling.coupled:
        return gumbel_pick(probs, sampling.seed, index)
    return sample(probs, rng)
