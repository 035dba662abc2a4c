"""Token-level divergences between the target's distribution p and the draft's q (DistillSpec).

DistillSpec (Zhou et al. 2024, "DistillSpec: Improving Speculative Decoding via Knowledge
Distillation") trains the draft with one of: forward KL, reverse KL, total variation
distance (TVD; 1 - TVD is the expected acceptance rate of one drafted token, the quantity
speculative decoding depends on) and the generalized Jensen-Shannon divergence JSD[beta]
of Agarwal et al. (2024, GKD):

    JSD[beta](p || q) = beta * KL(p || m) + (1 - beta) * KL(q || m),   m = beta * p + (1 - beta) * q

Every function takes logits [..., vocab] of the target (p) and the draft (q), a temperature
applied to both, and an optional mask [...] of the positions that count; it returns the
masked mean over positions (a scalar), or the per-position values with reduction="none".
All math is in float32 on log-probabilities; the target side is detached, so gradients reach
the draft only.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F


def _log_probs(target_logits: torch.Tensor, draft_logits: torch.Tensor, temperature: float):
    if target_logits.shape != draft_logits.shape:
        raise ValueError(f"target and draft logits differ in shape: {tuple(target_logits.shape)} vs "
                         f"{tuple(draft_logits.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    log_p = F.log_softmax(target_logits.detach().float() / temperature, dim=-1)
    log_q = F.log_softmax(draft_logits.float() / temperature, dim=-1)
    return log_p, log_q


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """KL(a || b) over the last axis; 0 * log 0 = 0 (tokens a gives no mass, e.g. masked by top-k)."""
    a = log_a.exp()
    terms = a * (log_a - log_b)
    return torch.where(a > 0, terms, torch.zeros_like(terms)).sum(-1)


def _reduce(values: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Masked mean over positions ([...] -> scalar), or the values themselves with 'none'."""
    if reduction == "none":
        return values if mask is None else values * mask.to(values.dtype)
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    if mask.shape != values.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match positions {tuple(values.shape)}")
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def forward_kl(target_logits, draft_logits, temperature: float = 1.0, mask=None, reduction: str = "mean"):
    """KL(p || q): mode-covering; the usual distillation loss (cross-entropy to p minus p's entropy)."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    return _reduce(_kl(log_p, log_q), mask, reduction)


def reverse_kl(target_logits, draft_logits, temperature: float = 1.0, mask=None, reduction: str = "mean"):
    """KL(q || p): mode-seeking; the draft puts its mass where the target has it."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    return _reduce(_kl(log_q, log_p), mask, reduction)


def total_variation(target_logits, draft_logits, temperature: float = 1.0, mask=None, reduction: str = "mean"):
    """TVD(p, q) = 1/2 sum |p - q| = 1 - sum min(p, q): one minus the expected acceptance rate."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    return _reduce(0.5 * (log_p.exp() - log_q.exp()).abs().sum(-1), mask, reduction)


def jsd(target_logits, draft_logits, temperature: float = 1.0, mask=None, reduction: str = "mean",
        beta: float = 0.5):
    """Generalized JSD[beta] = beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    beta = 0.5 is the symmetric Jensen-Shannon divergence (bounded by log 2); small beta behaves
    like forward KL scaled by beta, beta near 1 like reverse KL scaled by 1 - beta."""
    if not 0.0 < beta < 1.0:
        raise ValueError(f"JSD needs 0 < beta < 1 (beta=0 and 1 make it identically zero), got {beta}")
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
    values = beta * _kl(log_p, log_m) + (1.0 - beta) * _kl(log_q, log_m)
    return _reduce(values, mask, reduction)


DIVERGENCES: dict[str, Callable[..., torch.Tensor]] = {
    "fkl": forward_kl,
    "rkl": reverse_kl,
    "tvd": total_variation,
    "jsd": jsd,
}


def divergence(name: str, beta: float = 0.5) -> Callable[..., torch.Tensor]:
    """The divergence called `name` (fkl, rkl, tvd, jsd) as f(target_logits, draft_logits, temperature, mask, reduction)."""
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    if name == "jsd":
        if not 0.0 < beta < 1.0:
            raise ValueError(f"JSD needs 0 < beta < 1, got {beta}")
        return lambda t, d, temperature=1.0, mask=None, reduction="mean": jsd(t, d, temperature, mask, reduction, beta)
    return DIVERGENCES[name]


@torch.no_grad()
def agreement_stats(target_logits, draft_logits, temperature: float = 1.0, mask=None) -> dict[str, float]:
    """Sums over the (masked) positions: top-1 agreement, expected acceptance sum min(p, q), count.

    Sums rather than means, so that batches of different sizes add up exactly."""
    log_p, log_q = _log_probs(target_logits, draft_logits, temperature)
    agree = (target_logits.argmax(-1) == draft_logits.argmax(-1)).float()
    accept = torch.minimum(log_p.exp(), log_q.exp()).sum(-1)
    weight = torch.ones_like(accept) if mask is None else mask.float()
    return {"agree": float((agree * weight).sum()), "accept": float((accept * weight).sum()),
            "positions": float(weight.sum())}


def value_and_grad(name: str, target_logits: torch.Tensor, draft_logits: torch.Tensor, weights: torch.Tensor,
                   temperature: float = 1.0, beta: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """sum_i weights[i] * D_i and its gradient with respect to draft_logits [N, vocab] (float32).

    The same values as the functions above, with the gradient written out (z the draft
    logits, q = softmax(z / T), m = beta p + (1 - beta) q):
        fkl: (q - p) / T                 rkl: q (log q/p - KL(q||p)) / T
        tvd: q (s - <q, s>) / T, s = sign(q - p) / 2
        jsd: (1 - beta) q (log q/m - KL(q||m)) / T
    which takes about half the passes over the vocabulary that autograd does. A trainer runs
    the head in chunks of positions and calls draft_logits.backward(grad) on each chunk, so
    that no [positions, vocab] tensor outlives its chunk.
    """
    if name not in DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; choose one of {', '.join(DIVERGENCES)}")
    if name == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"JSD needs 0 < beta < 1, got {beta}")
    w = weights.detach().float().reshape(-1, 1)  # [N, 1]
    log_p, log_q = _log_probs(target_logits, draft_logits.detach(), temperature)
    q = log_q.exp()
    if name == "fkl":
        p = log_p.exp()
        terms = p * (log_p - log_q)
        values = torch.where(p > 0, terms, torch.zeros_like(terms)).sum(-1)
        grad = q.sub_(p)
    elif name == "rkl":
        log_ratio = log_q - log_p
        values = (q * log_ratio).sum(-1)
        grad = q.mul_(log_ratio.sub_(values[:, None]))
    elif name == "jsd":
        log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1.0 - beta))
        kl_pm = _kl(log_p, log_m)
        log_ratio = log_q.sub_(log_m)  # log q/m (log_q is not needed after this)
        kl_qm = (q * log_ratio).sum(-1)
        values = beta * kl_pm + (1.0 - beta) * kl_qm
        grad = q.mul_(log_ratio.sub_(kl_qm[:, None])).mul_(1.0 - beta)
    else:  # tvd
        diff = q - log_p.exp()
        values = 0.5 * diff.abs().sum(-1)
        s = diff.sign_().mul_(0.5)
        grad = q.mul_(s.sub_((q * s).sum(-1, keepdim=True)))
    grad.mul_(w / temperature)
    return (values * w[:, 0]).sum(), grad
