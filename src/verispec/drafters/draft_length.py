"""How many tokens a chain drafter should draft next: chosen from what it has observed.

transformers' heuristic schedule grows the length by 2 after a fully accepted draft and
shrinks it by 1 otherwise. This picks it instead from a model of the step: with per-token
acceptance rate a (the draft's token i is kept given tokens < i were), a chain of k yields
(1 - a^(k+1)) / (1 - a) tokens per target pass (the accepted ones plus the target's own;
`Acceptance` keeps a second rate for the first token, since drafts are bursty), and costs k
draft passes plus one target pass over k + 1 tokens. The length with the most
tokens per second wins, k = 0 (no draft: a plain decoding step) included.

The target's pass is not one cost: on a memory-bound device (a GPU, an avx512_bf16 CPU) a
pass over 8 tokens costs about what a pass over 1 does, on a compute-bound one (bf16 on an
AVX2 CPU, exact mode's row-by-row attention) several times more. So its time is fitted
online as t(k) = a + b * k (`PassCost`); drafting then switches itself off where it cannot
pay, and never falls far below plain decoding. Acceptance, the draft pass time and the
fit are running estimates (exponentially weighted, so a change of content, say from prose
to code, moves them within a few steps).
"""
from __future__ import annotations

import time


def expected_tokens(alpha: float, k: int, first: float | None = None) -> float:
    """Tokens per pass of a chain of k (incl. the bonus token) when each draft token after an
    accepted one is kept with probability alpha and the first with probability `first`
    (default alpha: the geometric model)."""
    first = alpha if first is None else first
    if k <= 0:
        return 1.0
    if alpha >= 1.0:
        return 1.0 + first * k
    return 1.0 + first * (1.0 - alpha ** k) / (1.0 - alpha)


def best_length(alpha: float, draft_s: float, target_s, k_max: int, k_min: int = 1,
                first: float | None = None) -> int:
    """The k in k_min..k_max with the most expected tokens per second. target_s: a pass's time,
    one number for every k or a function of k (the pass then verifies k drafted tokens)."""
    cost = target_s if callable(target_s) else (lambda k: target_s)
    return max(range(k_min, k_max + 1), key=lambda k: expected_tokens(alpha, k, first) / (k * draft_s + cost(k)))


class PassCost:
    """Online weighted least squares of a pass's time over its drafted tokens: t = a + b * n.

    Until the observed n spread enough to tell the slope, it is pulled toward a prior (a pass
    over 10 drafted tokens costing 1.3 one-token passes: between a memory-bound device, ~1.05,
    and bf16 on an AVX2 CPU, ~3), with the weight of a few observations."""

    PRIOR_SLOPE = 0.03  # of the mean observed time, per drafted token
    PRIOR_WEIGHT = 4.0  # in units of n^2 spread

    def __init__(self, decay: float = 0.95):
        self.decay = decay
        self.w = self.sn = self.st = self.snn = self.snt = 0.0

    def add(self, n: int, seconds: float) -> None:
        d = self.decay
        self.w, self.sn, self.st = d * self.w + 1, d * self.sn + n, d * self.st + seconds
        self.snn, self.snt = d * self.snn + n * n, d * self.snt + n * seconds

    @property
    def known(self) -> bool:
        return self.w > 0

    def coefficients(self) -> tuple[float, float]:
        """(a, b): the intercept and the per-token slope, b >= 0."""
        mean_n, mean_t = self.sn / self.w, self.st / self.w
        spread = self.snn - self.w * mean_n ** 2  # weighted sum of squared deviations of n
        cov = self.snt - self.w * mean_n * mean_t
        prior = self.PRIOR_SLOPE * mean_t
        slope = max(0.0, (cov + self.PRIOR_WEIGHT * prior) / (spread + self.PRIOR_WEIGHT))
        return max(mean_t - slope * mean_n, 1e-9), slope

    def __call__(self, n: int) -> float:
        a, b = self.coefficients()
        return a + b * n


class Acceptance:
    """Running counts of how drafts fare, in two rates: `first`, that a draft's first token is
    kept, and `rate`, that a token after a kept one is kept too. Drafts are bursty (prompt
    lookup's first token is kept a third of the time here, the ones after a kept token three
    times in four): one geometric rate for both would make long drafts look worthless.
    `rate` forgets per observed token (a memory of about 1 / (1 - token_decay) tokens), so a
    long accepted run does not outweigh the rejections that follow it; `first` per draft."""

    def __init__(self, token_decay: float = 0.95, draft_decay: float = 0.9):
        # pseudo-counts: both rates start at 0.6, with the weight of a few tokens
        self.token_decay, self.draft_decay = token_decay, draft_decay
        self._first = [1.8, 1.2]  # kept, lost
        self._next = [1.8, 1.2]

    @property
    def first(self) -> float:
        return self._first[0] / sum(self._first)

    @property
    def rate(self) -> float:
        return self._next[0] / sum(self._next)

    def add(self, drafted: int, accepted: int) -> None:
        """One draft's verdict: `accepted` of its first `drafted` tokens kept (a prefix)."""
        if not drafted:
            return
        rejected = 1 if accepted < drafted else 0
        forget = self.token_decay ** (accepted + rejected)
        self._next[0] *= forget
        self._next[1] *= forget
        self._first[0] *= self.draft_decay  # one trial per draft: forgotten per draft
        self._first[1] *= self.draft_decay
        self._first[0 if accepted else 1] += 1
        if accepted:  # tokens 2..: accepted - 1 kept after a kept one, then maybe the rejection
            self._next[0] += accepted - 1
            self._next[1] += rejected


class AdaptiveLength:
    """Running estimates of acceptance and costs; `next()` is the next draft length.

    Call order per step: next(), drafted() (after drafting, before the target's pass),
    verified() (after it); begin() at each generation's start. A generation's first pass
    also prefills the prompt, so its time is not taken for a pass's. Every `explore_every`
    steps it drafts 2 tokens more than it chose: without that, a policy that settled on short
    drafts would never see how long ones fare (the continuation's acceptance, the pass
    time's slope) and could not come back from an early pessimistic estimate. k_min = 0 lets the policy stop drafting; then every
    `probe_every` steps it drafts `k_probe` tokens anyway, so that the acceptance it would
    need to start again stays measured (None: never; for a drafter that scores the draft it
    did not propose for free, as prompt lookup does)."""

    def __init__(self, k_start: int = 4, k_max: int = 12, decay: float = 0.9, token_decay: float = 0.95,
                 k_min: int = 0, probe_every: int | None = 8, k_probe: int = 2, explore_every: int | None = 4):
        self.k, self.k_max, self.k_min, self.decay = k_start, k_max, k_min, decay
        self.probe_every, self.k_probe, self.explore_every = probe_every, min(k_probe, k_max), explore_every
        self._count = 0
        self.acceptance = Acceptance(token_decay)
        self.cost = PassCost()
        self.draft_s: float | None = None  # one draft pass; None: not measured (or free)
        self._proposed_at: float | None = None
        self._prefilled = False  # this generation's first pass (the prompt's prefill) is done
        self._idle = 0  # steps in a row at k = 0

    def begin(self) -> None:
        """A new generation: its first pass prefills a prompt again (the estimates are kept)."""
        self._prefilled = False
        self._proposed_at = None

    def next(self, acceptance: Acceptance | None = None) -> int:
        """The next length; acceptance: this step's estimate when the drafter keeps its own."""
        if self.cost.known:
            acc = self.acceptance if acceptance is None else acceptance
            self.k = best_length(acc.rate, self.draft_s or 0.0, self.cost, self.k_max, self.k_min, acc.first)
        self._count += 1
        if self.k > 0 or self.probe_every is None:
            self._idle = 0
            if self.k and self.explore_every and self._count % self.explore_every == 0:
                return min(self.k + 2, self.k_max)  # a longer draft now and then: the data to revise k by
            return self.k
        self._idle += 1
        if self._idle < self.probe_every:
            return 0
        self._idle = 0
        return self.k_probe

    def drafted(self, n_passes: int, seconds: float) -> None:
        """The draft spent `seconds` on `n_passes` one-token passes (the catch-up excluded)."""
        if n_passes:
            self.draft_s = self._ewma(self.draft_s, seconds / n_passes)
        self._proposed_at = time.perf_counter()

    def verified(self, drafted: int, accepted: int | None = None) -> None:
        """The target's pass verified `drafted` chain tokens (the time since drafted() is that pass
        and its verification) and kept `accepted` of them (None: the drafter keeps its own count)."""
        if self._proposed_at is not None:
            if self._prefilled:  # the first pass prefilled the prompt too: not a pass's time
                self.cost.add(drafted, time.perf_counter() - self._proposed_at)
            self._prefilled = True
            self._proposed_at = None
        if accepted is not None:
            self.acceptance.add(drafted, accepted)

    def _ewma(self, old: float | None, new: float) -> float:
        return new if old is None else self.decay * old + (1 - self.decay) * new
