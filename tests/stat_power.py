"""How many draws a distribution test needs, from a power calculation instead of a magic number.

The statistical tests draw N outputs, count them per cell (a token, or a pair of tokens) and
run Pearson's chi-square goodness-of-fit test against the exact distribution. Two error rates
size N:

* false alarm: a correct implementation fails with probability ALPHA (the p-value threshold);
* miss: an implementation whose output follows a deliberately biased distribution passes with
  probability 1 - POWER.

Under the biased distribution b, Pearson's statistic over N draws is approximately noncentral
chi-square with df = cells - 1 and noncentrality N * w2, where w2 = sum((b - e)^2 / e) is the
chi-square divergence of b from the exact e (Cohen's w squared). N is the smallest count whose
noncentral chi-square exceeds the ALPHA critical value with probability POWER.

The chi-square approximation needs expected counts of a few per cell, so cells expected fewer
than MIN_COUNT times at N draws are pooled into one (both in the power calculation and in the
test itself: use `pooled_chisquare`). Cells the exact distribution gives probability 0 are left
out: the tests assert separately that they never occur.
"""
from __future__ import annotations

import math

import numpy as np
from scipy.optimize import brentq
from scipy.stats import chi2, chisquare, ncx2

ALPHA = 1e-3  # false-alarm rate of every distribution test
POWER = 0.99  # chance of catching the deliberately biased distribution
MIN_COUNT = 5.0  # cells expected fewer times are pooled


def _flat(x) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().double().cpu().numpy()
    return np.asarray(x, dtype=np.float64).ravel()


def _pool(expected: np.ndarray, n: float, min_count: float) -> list[np.ndarray]:
    """Groups of cell indices: every cell with an expected count >= min_count alone, the rest
    pooled (the pool takes the next-rarest cells until it too reaches min_count)."""
    order = [i for i in np.argsort(expected, kind="stable") if expected[i] > 0]
    pooled: list[int] = []
    while order and (expected[order[0]] * n < min_count or 0 < expected[pooled].sum() * n < min_count):
        pooled.append(order.pop(0))
    return [np.array([i]) for i in order] + ([np.array(pooled)] if pooled else [])


def pooled_chisquare(counts, expected_probs, min_count: float = MIN_COUNT) -> float:
    """Pearson chi-square p-value of `counts` against `expected_probs` (any shapes, same size),
    rare cells pooled as in `draws_for_power`; cells of probability 0 are left out."""
    counts, e = _flat(counts), _flat(expected_probs)
    e = e / e.sum()
    groups = _pool(e, counts[e > 0].sum(), min_count)
    obs = np.array([counts[g].sum() for g in groups])
    exp = np.array([e[g].sum() for g in groups])
    return float(chisquare(obs, exp / exp.sum() * obs.sum()).pvalue)


def noncentrality_per_draw(expected, biased, n: float | None, min_count: float = MIN_COUNT) -> tuple[float, int]:
    """(w2, df) of the pooled table at n draws (n None: no pooling): w2 = sum((b - e)^2 / e)
    over the cells, where the exact e is not 0."""
    e, b = _flat(expected), _flat(biased)
    e, b = e / e.sum(), b / b.sum()
    groups = [np.array([i]) for i in np.flatnonzero(e > 0)] if n is None else _pool(e, n, min_count)
    eg = np.array([e[g].sum() for g in groups])
    bg = np.array([b[g].sum() for g in groups])
    return float(((bg - eg) ** 2 / eg).sum()), len(groups) - 1


def draws_for_power(expected, biased, alpha: float = ALPHA, power: float = POWER,
                    min_count: float = MIN_COUNT, max_draws: int = 200_000) -> int:
    """The fewest draws with which the pooled chi-square test at level `alpha` rejects data
    drawn from `biased` with probability >= `power` (noncentral chi-square approximation),
    while `expected` itself passes with probability 1 - alpha.

    expected: the exact distribution the implementation must reproduce; biased: the one a
    deliberately wrong rule produces (same shape). Raises if even max_draws is not enough
    (the bias is too small to be worth a test of this size)."""
    def enough(n: int) -> bool:
        w2, df = noncentrality_per_draw(expected, biased, n, min_count)
        return df > 0 and w2 > 0 and ncx2.sf(chi2.isf(alpha, df), df, n * w2) >= power

    def first_guess() -> int:  # the unpooled answer: exact when no cell is pooled
        w2, df = noncentrality_per_draw(expected, biased, None)
        crit = chi2.isf(alpha, df)
        return max(1, math.ceil(brentq(lambda lam: ncx2.sf(crit, df, lam) - power, 1e-9, 1e7) / w2))

    lo, hi = 0, max(first_guess(), 8)
    while not enough(hi):  # pooling costs power: grow until enough ...
        lo, hi = hi, 2 * hi
        if hi > max_draws:
            raise ValueError(f"more than {max_draws} draws needed for power {power} at alpha {alpha}")
    while hi - lo > 1:  # ... then bisect (power grows with n but for pooling steps)
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid, hi)
    return hi


def slipped_pair(exact) -> np.ndarray:
    """The biased distribution of a token pair whose second token was verified against the
    wrong context: it follows the first token's marginal, independent of the first token
    (what a rule reading the wrong row of the target's logits, or a cache one token off,
    produces). exact: [V, V] joint of (first, second) token."""
    joint = exact.detach().double().cpu().numpy() if hasattr(exact, "detach") else np.asarray(exact, np.float64)
    first = joint.sum(1)
    return np.outer(first, first)
