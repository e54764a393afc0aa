"""Evaluation metrics (docs/methods.md, section 4), in float64 on plain lists.

- win rates against the reference (ties count one half);
- a length-controlled reward: rewards regressed on standardised length over the reference's
  samples, r = a + b*z with z = (len - mean_ref_len) / std_ref_len; a model's LC reward is
  mean(r - b*z), its reward at the reference's mean length;
- KL to the reference from the policy's own samples, r = logp_pi - logp_ref:
  k1 = mean(r), k3 = mean(exp(-r) - 1 + r) (unbiased, and k3 >= 0 per sample);
- the length bias of the implicit reward: Spearman's rho between completion length and
  logp_pi - logp_ref (the same for beta*(logp_pi - logp_ref) with any beta > 0);
- pass@k = mean over problems of 1 - C(n-c, k)/C(n, k).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


def mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if len(xs) else math.nan


def _beat(a: float, b: float) -> float:
    return 1.0 if a > b else 0.5 if a == b else 0.0


def win_rate(model: Sequence[float], reference: Sequence[float]) -> float:
    """Per prompt, the model's mean reward against the reference's: win 1, tie 1/2, loss 0."""
    if len(model) != len(reference):
        raise ValueError(f"{len(model)} prompts against {len(reference)}")
    return mean([_beat(a, b) for a, b in zip(model, reference)])


def pairwise_win_rate(model: Sequence[Sequence[float]], reference: Sequence[Sequence[float]]):
    """P(model sample beats a reference sample of the same prompt), ties 1/2, prompt-averaged."""
    return mean([mean([_beat(a, b) for a in ms for b in rs]) for ms, rs in zip(model, reference)])


@dataclass
class LengthFit:
    """reward ~ a + b * (length - mean) / std, fitted on the reference's samples."""

    a: float
    b: float
    mean: float
    std: float

    def z(self, length: float) -> float:
        return (length - self.mean) / self.std if self.std > 0 else 0.0

    def controlled(self, rewards: Sequence[float], lengths: Sequence[float]) -> list[float]:
        """Each reward minus its length effect: r - b*z."""
        return [r - self.b * self.z(n) for r, n in zip(rewards, lengths)]

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "mean_length": self.mean, "std_length": self.std}


def fit_length(lengths: Sequence[float], rewards: Sequence[float]) -> LengthFit:
    """Least squares on the standardised length (population std); b = 0 when every reference
    sample has the same length."""
    m = mean(lengths)
    std = math.sqrt(mean([(n - m) ** 2 for n in lengths]))
    fit = LengthFit(a=mean(rewards), b=0.0, mean=m, std=std)
    if std > 0:
        z = [fit.z(n) for n in lengths]
        fit.b = math.fsum(zi * (r - fit.a) for zi, r in zip(z, rewards)) / math.fsum(
            zi * zi for zi in z
        )
        fit.a = mean(rewards) - fit.b * mean(z)
    return fit


def kl_estimates(logps: Sequence[float], ref_logps: Sequence[float]) -> tuple[float, float]:
    """(k1, k3) from samples of the policy: r = logp - ref_logp."""
    ratios = [lp - lr for lp, lr in zip(logps, ref_logps)]
    k1 = mean(ratios)
    k3 = mean([math.expm1(-r) + r for r in ratios])
    return k1, k3


def ranks(xs: Sequence[float]) -> list[float]:
    """1-based ranks, ties get their average rank."""
    order = sorted(range(len(xs)), key=lambda i: xs[i])
    out = [0.0] * len(xs)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and xs[order[j + 1]] == xs[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    mx, my = mean(x), mean(y)
    sxy = math.fsum((a - mx) * (b - my) for a, b in zip(x, y))
    sxx = math.fsum((a - mx) ** 2 for a in x)
    syy = math.fsum((b - my) ** 2 for b in y)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rho (Pearson correlation of average ranks); NaN if either side is constant."""
    if len(x) != len(y):
        raise ValueError(f"{len(x)} against {len(y)} values")
    return pearson(ranks(x), ranks(y))


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n-c, k) / C(n, k): the chance that k of the n samples include a correct one."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n (n={n}, c={c}, k={k})")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def mean_pass_at_k(counts: Sequence[tuple[int, int]], k: int) -> float:
    """Mean over problems of pass@k, from (n, c) per problem."""
    return mean([pass_at_k(n, c, k) for n, c in counts])
