"""Metrics against hand computations and independent references (scipy, numpy, exact KL)."""

import math
import random
from math import comb

import numpy as np
import pytest
import torch

from qrpo.evaluate import metrics


def test_win_rate_counts_ties_as_half():
    # per prompt: win, tie, loss, tie -> (1 + 1/2 + 0 + 1/2) / 4
    assert metrics.win_rate([0.5, 0.2, 0.7, 0.1], [0.3, 0.2, 0.9, 0.1]) == 0.5
    assert metrics.win_rate([1.0, 1.0], [0.0, 1.0]) == 0.75
    assert metrics.win_rate([0.3], [0.3]) == 0.5
    with pytest.raises(ValueError):
        metrics.win_rate([1.0], [1.0, 2.0])


def test_pairwise_win_rate_by_hand():
    # prompt 1: (1 vs 0) win, (1 vs 1) tie, (0 vs 0) tie, (0 vs 1) loss -> 2/4
    # prompt 2: 3 > 1 and 3 > 2 -> 1
    assert metrics.pairwise_win_rate([[1, 0], [3]], [[0, 1], [1, 2]]) == pytest.approx(0.75)


def test_length_controlled_reward_by_hand():
    # Reference: reward = length exactly; lengths 1, 2, 3 -> mean 2, std sqrt(2/3),
    # z = (-sqrt(3/2), 0, sqrt(3/2)), slope b = std = sqrt(2/3), intercept a = 2.
    fit = metrics.fit_length([1, 2, 3], [1.0, 2.0, 3.0])
    assert fit.mean == 2 and fit.std == pytest.approx(math.sqrt(2 / 3))
    assert fit.b == pytest.approx(math.sqrt(2 / 3)) and fit.a == pytest.approx(2.0)
    # A model with length 4 and reward 3: z = 2 / sqrt(2/3), LC reward = 3 - b*z = 3 - 2 = 1,
    # i.e. its reward at the reference's mean length along the reference's trend.
    assert metrics.fit_length([1, 2, 3], [1, 2, 3]).controlled([3.0], [4]) == pytest.approx([1.0])
    # The reference's own LC reward is its mean reward (its mean z is 0).
    assert metrics.mean(fit.controlled([1, 2, 3], [1, 2, 3])) == pytest.approx(2.0)


def test_length_fit_matches_least_squares():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 40, size=50).astype(float)
    rewards = 0.02 * lengths + rng.normal(0, 0.1, size=50)
    fit = metrics.fit_length(lengths.tolist(), rewards.tolist())
    z = (lengths - lengths.mean()) / lengths.std()
    b, a = np.polyfit(z, rewards, 1)
    assert fit.b == pytest.approx(b) and fit.a == pytest.approx(a)
    same = metrics.fit_length([3, 3, 3], [0.1, 0.5, 0.9])  # no spread in length: no correction
    assert same.b == 0 and same.controlled([0.7], [10]) == [0.7]


def test_kl_estimators_match_the_formulas_and_the_exact_kl():
    g = torch.Generator().manual_seed(0)
    logp, ref = torch.randn(64, generator=g, dtype=torch.float64), torch.randn(64, generator=g)
    k1, k3 = metrics.kl_estimates(logp.tolist(), ref.double().tolist())
    r = logp - ref.double()
    assert k1 == pytest.approx(r.mean().item(), rel=1e-12)
    assert k3 == pytest.approx((torch.exp(-r) - 1 + r).mean().item(), rel=1e-12)
    assert metrics.kl_estimates([1.5, -2.0], [1.5, -2.0]) == (0.0, 0.0)
    # Unbiased: on samples of p, both estimate KL(p || q) of two categorical distributions.
    p = torch.tensor([0.5, 0.3, 0.15, 0.05], dtype=torch.float64)
    q = torch.tensor([0.25, 0.25, 0.25, 0.25], dtype=torch.float64)
    exact = (p * (p / q).log()).sum().item()
    ys = torch.multinomial(p, 40_000, replacement=True, generator=g)
    k1, k3 = metrics.kl_estimates(p.log()[ys].tolist(), q.log()[ys].tolist())
    assert k1 == pytest.approx(exact, abs=0.01) and k3 == pytest.approx(exact, abs=0.01)


def test_spearman_matches_scipy_with_ties():
    scipy_stats = pytest.importorskip("scipy.stats")
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(3, 40)
        x = [rng.randint(0, 6) for _ in range(n)]  # many ties
        y = [rng.gauss(0, 1) + 0.3 * a for a in x]
        if len(set(x)) == 1:
            continue
        assert metrics.spearman(x, y) == pytest.approx(scipy_stats.spearmanr(x, y)[0], abs=1e-12)
    assert metrics.ranks([10, 20, 20, 5]) == [2, 3.5, 3.5, 1]
    assert math.isnan(metrics.spearman([1, 2, 3], [0, 0, 0]))  # constant: undefined


def test_pass_at_k_by_hand():
    # n=5 samples, c=2 correct: pass@1 = 2/5; pass@2 = 1 - C(3,2)/C(5,2) = 1 - 3/10 = 0.7;
    # pass@4: any 4 of 5 samples include a correct one (only 3 are wrong) -> 1.
    assert metrics.pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert metrics.pass_at_k(5, 2, 2) == pytest.approx(0.7)
    assert metrics.pass_at_k(5, 2, 4) == 1.0
    assert metrics.pass_at_k(5, 0, 3) == 0.0
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1 - comb(n - c, k) / comb(n, k)
                assert metrics.pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)
    assert metrics.mean_pass_at_k([(5, 2), (5, 0)], 1) == pytest.approx(0.2)
    with pytest.raises(ValueError):
        metrics.pass_at_k(3, 1, 4)
