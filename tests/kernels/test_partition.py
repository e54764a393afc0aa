"""The finite-K and empirical partition forms (qrpo/kernels/partition.py, docs/partition.md).

Expected values come from python loops that enumerate every case exactly (every position of the
completion among K+1 exchangeable rewards, or every (K+1)-tuple of a small discrete reward
distribution with its probability), with f written again here with math/scipy, so they share
no code with qrpo/kernels/. The Triton backend runs through the CPU interpreter (tests/conftest.py).
"""

from __future__ import annotations

import itertools
import math
import os

import pytest
import scipy.special
import torch

from qrpo.kernels import log_partition, qrpo_loss
from qrpo.kernels.partition import (
    log_partition_empirical,
    log_partition_finite_k,
    row_log_partition,
)
from qrpo.kernels.qrpo import TRANSFORMS  # a new transform is tested everywhere below

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors")
SIGMA = 0.8  # scale of scaled_normal_icdf in these tests


def f_py(transform: str, q: float, k: int) -> float:
    """f(q) with the loss's clamps (log: q >= 1/K; normal icdf: 1/K <= q <= (K-1)/K)."""
    if transform == "identity":
        return q
    if transform == "log":
        return math.log(max(q, 1 / k))
    if transform in ("normal_icdf", "scaled_normal_icdf"):
        z = float(scipy.special.ndtri(min(max(q, 1 / k), (k - 1) / k)))
        return z * (SIGMA if transform == "scaled_normal_icdf" else 1.0)
    if transform == "square":
        return q * q
    return math.sqrt(q)


def q_py(r: float, refs: list[float], estimator: str) -> float:
    less = sum(x < r for x in refs)
    equal = sum(x == r for x in refs)
    return (less + (equal if estimator == "inclusive" else 0.5 * equal)) / len(refs)


def log_mean_exp(values: list[float], weights: list[float] | None = None) -> float:
    """log sum_i w_i exp(v_i), stably (w = 1/n by default)."""
    w = weights or [1 / len(values)] * len(values)
    top = max(values)
    return top + math.log(sum(wi * math.exp(v - top) for v, wi in zip(values, w)))


def rows(b: int, value: float) -> torch.Tensor:
    return torch.full((b,), value, dtype=torch.float64)


def min_k(transform: str) -> int:
    return 3 if "normal" in transform else 1


# --- finite_k: exact enumeration over the K+1 exchangeable positions ----------------------------


@pytest.mark.parametrize("layout", ["exclude_self", "separate"])
@pytest.mark.parametrize("estimator", ["inclusive", "midrank", "randomized"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_finite_k_equals_enumeration_of_exchangeable_positions(transform, estimator, layout):
    """Distinct rewards: the completion is equally likely to be any of the K+1 exchangeable
    draws; averaging exp(f(q_hat)/beta) over the K+1 positions, with q_hat from the loss itself,
    gives Z_K, for each estimator, in both layouts (own reward excluded, or passed apart)."""
    g = torch.Generator().manual_seed(3)
    beta = 0.3
    for k in range(min_k(transform), 7):
        values = torch.randn(k + 1, generator=g, dtype=torch.float64)
        b = k + 1
        if layout == "exclude_self":  # the row's own reward sits in ref_rewards, left out
            ref = values.expand(b, -1).clone()
            exclude = torch.arange(b)
            rewards = values.clone()
        else:  # K other rewards, plus a padded, masked column so the width exceeds K
            ref = torch.stack(
                [torch.cat([values[:i], values[i + 1 :], values[:1]]) for i in range(b)]
            )
            exclude = None
            rewards = values.clone()
        mask = torch.ones_like(ref, dtype=torch.bool)
        if layout == "separate":
            mask[:, -1] = False
        logps = torch.zeros(b, dtype=torch.float64, requires_grad=True)
        _, stats = qrpo_loss(
            logps, logps.detach(), rewards, ref, beta, transform=transform, estimator=estimator,
            ref_mask=mask, exclude_index=exclude, sigma=SIGMA, partition="finite_k",
            return_stats=True, backend="torch",
        )  # fmt: skip
        # The loss's own q (float32 stats) and an independent one must agree.
        others = [[float(v) for j, v in enumerate(values) if j != i] for i in range(b)]
        want_q = [q_py(float(values[i]), others[i], estimator) for i in range(b)]
        torch.testing.assert_close(stats.q.double(), torch.tensor(want_q, dtype=torch.float64))
        enumerated = log_mean_exp([f_py(transform, q, k) / beta for q in want_q])
        got = stats.beta_logz.double() / beta
        torch.testing.assert_close(got, rows(b, enumerated), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("transform", ["log", "normal_icdf"])
def test_finite_k_clamps_the_end_points_as_the_loss_does(transform):
    """f(0) = -inf for log and the normal icdf: the loss clamps q to >= 1/K, so the q = 0 grid
    point enters Z_K as exp(f(1/K)/beta), not as 0 (and q = 1 as f((K-1)/K) for the icdf)."""
    beta, k = 0.2, 5
    got = log_partition_finite_k(transform, rows(1, beta), torch.tensor([k]), 8).item()
    grid = [f_py(transform, j / k, k) / beta for j in range(k + 1)]
    assert got == pytest.approx(log_mean_exp(grid), rel=1e-12)
    dropped = log_mean_exp(grid[1:])  # the alternative of dropping the point is a different Z
    assert abs(got - dropped) > 1e-3


def test_finite_k_uses_each_rows_own_k():
    """K varies per row with ref_mask and exclude_index: each row gets the grid of its own K."""
    ref = torch.arange(12, dtype=torch.float64).reshape(2, 6)
    mask = torch.tensor([[True] * 6, [True, True, True, False, False, True]])
    exclude = torch.tensor([2, -1])  # row 0: K = 5; row 1: K = 4
    beta = rows(2, 0.1)
    got = row_log_partition(
        "finite_k", "identity", beta, sigma=None, ref_rewards=ref, ref_mask=mask,
        exclude_index=exclude, estimator="inclusive",
    )  # fmt: skip
    want = [log_mean_exp([j / k / 0.1 for j in range(k + 1)]) for k in (5, 4)]
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), rtol=1e-13, atol=0)


# --- empirical: exact expectations under ties ---------------------------------------------------

LEVELS = (0.0, 0.5, 1.0)  # graded rewards: pass / partial / fail
PROBS = (0.5, 0.3, 0.2)


@pytest.mark.parametrize("estimator", ["inclusive", "midrank"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_empirical_is_unbiased_for_the_exact_z_under_ties(transform, estimator):
    """Rewards with 3 levels, K + 1 i.i.d. draws (the prompt's reference completions), the row
    being draw 0 with its own reward excluded. Enumerating all 3^(K+1) tuples with their
    probabilities: E[Z_empirical] equals the exact E[exp(f(q_hat)/beta)] of the completion, while
    the finite-K grid (which assumes no ties) and the closed form do not."""
    beta = 0.25
    for k in range(max(2, min_k(transform)), 6):
        tuples = list(itertools.product(range(len(LEVELS)), repeat=k + 1))
        prob = [math.prod(PROBS[i] for i in t) for t in tuples]
        values = torch.tensor([[LEVELS[i] for i in t] for t in tuples], dtype=torch.float64)
        b = len(tuples)
        exact = log_mean_exp(
            [
                f_py(transform, q_py(LEVELS[t[0]], [LEVELS[i] for i in t[1:]], estimator), k) / beta
                for t in tuples
            ],
            prob,
        )
        log_z = log_partition_empirical(
            transform, rows(b, beta), values, None, torch.zeros(b, dtype=torch.long), estimator,
            rows(b, SIGMA),
        )  # fmt: skip
        got = torch.logsumexp(log_z + torch.tensor(prob, dtype=torch.float64).log(), 0).item()
        assert got == pytest.approx(exact, rel=1e-12, abs=1e-12)
        k_rows = torch.tensor([k])
        finite_k = log_partition_finite_k(transform, rows(1, beta), k_rows, k, rows(1, SIGMA))
        closed = log_partition(transform, beta, SIGMA)
        assert abs(finite_k.item() - exact) > 1e-3
        assert abs(closed.item() - exact) > 1e-3


@pytest.mark.parametrize("estimator", ["inclusive", "midrank"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_empirical_plug_in_is_the_exact_mean_over_the_reference_set(transform, estimator):
    """A row without exclusion: a fresh draw from the empirical distribution of its K reference
    rewards, scored against all K (ties with itself counted). The loss's own q for each of the
    K possible completions, averaged, gives the same Z."""
    g = torch.Generator().manual_seed(5)
    beta = 0.4
    for k in range(min_k(transform), 7):
        refs = torch.randint(0, 3, (k,), generator=g).double()  # ties
        ref = refs.expand(k, -1).clone()
        logps = torch.zeros(k, dtype=torch.float64, requires_grad=True)
        _, stats = qrpo_loss(
            logps, logps.detach(), refs.clone(), ref, beta, transform=transform,
            estimator=estimator, sigma=SIGMA, partition="empirical", return_stats=True,
            backend="torch",
        )  # fmt: skip
        want_q = [q_py(float(r), refs.tolist(), estimator) for r in refs]
        torch.testing.assert_close(stats.q.double(), torch.tensor(want_q, dtype=torch.float64))
        want = log_mean_exp([f_py(transform, q, k) / beta for q in want_q])
        torch.testing.assert_close(
            stats.beta_logz.double() / beta, rows(k, want), rtol=1e-6, atol=1e-6
        )


@pytest.mark.parametrize("estimator", ["inclusive", "midrank"])
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_empirical_without_ties_is_the_finite_k_grid(transform, estimator):
    """Distinct rewards: in the exclusion layout the empirical form is Z_K itself; without
    exclusion it is the plug-in grid (inclusive: j/K, j = 1..K; midrank: (j - 1/2)/K)."""
    beta = 0.15
    k = 6
    values = torch.randperm(k + 1, generator=torch.Generator().manual_seed(2)).double()[None]
    got = log_partition_empirical(
        transform, rows(1, beta), values, None, torch.tensor([4]), estimator, rows(1, SIGMA)
    )
    want = log_partition_finite_k(transform, rows(1, beta), torch.tensor([k]), k, rows(1, SIGMA))
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    plug_in = log_partition_empirical(
        transform, rows(1, beta), values[:, :k], None, None, estimator, rows(1, SIGMA)
    ).item()
    shift = 0.0 if estimator == "inclusive" else 0.5
    grid = [f_py(transform, (j - shift) / k, k) / beta for j in range(1, k + 1)]
    assert plug_in == pytest.approx(log_mean_exp(grid), rel=1e-12)


# --- the K -> infinity limit --------------------------------------------------------------------


@pytest.mark.parametrize("transform", TRANSFORMS)
def test_finite_forms_tend_to_the_closed_form(transform):
    """Z_K is a Riemann sum of int_0^1 exp(f(q)/beta) dq: its gap to the closed form shrinks as
    K grows and is small at K = 20000; so does the empirical form of K + 1 distinct rewards."""
    beta = 0.5
    closed = log_partition(transform, beta, SIGMA).item()
    gaps = []
    for k in (10, 100, 1000, 20000):
        got = log_partition_finite_k(
            transform, rows(1, beta), torch.tensor([k]), k, rows(1, SIGMA)
        ).item()
        gaps.append(abs(got - closed))
    assert all(a > b for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] < (1e-2 if "normal" in transform else 1e-4), gaps
    k = 20000
    values = torch.rand(1, k + 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    empirical = log_partition_empirical(
        transform, rows(1, beta), values, None, torch.tensor([0]), "inclusive", rows(1, SIGMA)
    ).item()
    assert abs(empirical - closed) == pytest.approx(gaps[-1], rel=1e-9)


# --- the loss: backends, gradients, validation --------------------------------------------------


def tied_batch(seed: int = 0, b: int = 13, k: int = 9):
    """Integer rewards (ties), a ragged mask, some rows excluding their own column."""
    g = torch.Generator().manual_seed(seed)
    ref = torch.randint(0, 4, (b, k), generator=g).double()
    mask = torch.rand(b, k, generator=g) > 0.3
    mask[:, :4] = True
    exclude = torch.randint(-1, 4, (b,), generator=g)
    rewards = torch.where(exclude >= 0, ref.gather(1, exclude.clamp(0)[:, None])[:, 0], ref[:, 5])
    logps = (-30 + 5 * torch.randn(b, generator=g, dtype=torch.float64)).float().double()
    ref_logps = (logps + torch.randn(b, generator=g, dtype=torch.float64)).float().double()
    sigma = 0.5 + torch.rand(b, generator=g, dtype=torch.float64)
    return dict(logps=logps, ref_logps=ref_logps, rewards=rewards, ref_rewards=ref, mask=mask,
                exclude=exclude, sigma=sigma)  # fmt: skip


def run(batch, backend, partition, transform, estimator, beta=0.07):
    device = batch["logps"].device
    logps = batch["logps"].float().clone().requires_grad_()
    loss, stats = qrpo_loss(
        logps, batch["ref_logps"].float(), batch["rewards"], batch["ref_rewards"], beta,
        transform=transform, estimator=estimator, ref_mask=batch["mask"],
        exclude_index=batch["exclude"], sigma=batch["sigma"], partition=partition,
        generator=torch.Generator(device).manual_seed(11), return_stats=True, backend=backend,
    )  # fmt: skip
    weights = torch.linspace(-1.0, 2.0, len(loss), device=device)
    (loss * weights).sum().backward()
    return loss.detach(), logps.grad, stats, weights


CASES = [
    (p, e)
    for p in ("closed_form", "finite_k", "empirical")
    for e in ("inclusive", "midrank", "randomized")
    if not (p == "empirical" and e == "randomized")
]


@needs_interpreter
@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("partition,estimator", CASES)
def test_triton_matches_torch(partition, estimator, transform):
    batch = tied_batch(seed=1)
    loss_t, grad_t, stats_t, _ = run(batch, "torch", partition, transform, estimator)
    loss_k, grad_k, stats_k, _ = run(batch, "triton", partition, transform, estimator)
    torch.testing.assert_close(stats_k.beta_logz, stats_t.beta_logz, rtol=0, atol=0)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_k, grad_t, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats_k.residual, stats_t.residual, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["torch", pytest.param("triton", marks=needs_interpreter)])
@pytest.mark.parametrize("partition,estimator", CASES)
def test_gradient_form_is_unchanged(partition, estimator, backend):
    """log Z is a constant of the regression: for every form d loss / d logps = -2 beta residual,
    the residual differs from the closed form's by exactly beta * (log Z_f - log Z_form) per row,
    and log Z does not move when the policy's log-probs do."""
    batch = tied_batch(seed=2)
    beta = 0.07
    loss, grad, stats, weights = run(batch, backend, partition, "identity", estimator, beta)
    torch.testing.assert_close(grad, -2 * beta * stats.residual * weights, rtol=1e-5, atol=1e-6)
    _, _, closed, _ = run(batch, backend, "closed_form", "identity", estimator, beta)
    shift = stats.beta_logz.double() - closed.beta_logz.double()
    torch.testing.assert_close(
        closed.residual.double() - stats.residual.double(), shift, rtol=1e-5, atol=1e-5
    )
    moved = dict(batch, logps=batch["logps"] + 3.0)
    _, _, stats_moved, _ = run(moved, backend, partition, "identity", estimator, beta)
    torch.testing.assert_close(stats_moved.beta_logz, stats.beta_logz, rtol=0, atol=0)


def test_partition_arguments_are_checked():
    batch = tied_batch()
    with pytest.raises(ValueError, match="partition must be one of"):
        run(batch, "torch", "finite", "identity", "inclusive")
    with pytest.raises(ValueError, match="partition='empirical' needs estimator"):
        run(batch, "torch", "empirical", "identity", "randomized")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("transform", ["identity", "normal_icdf"])
@pytest.mark.parametrize("partition,estimator", CASES)
def test_cuda_triton_matches_torch(partition, estimator, transform):
    """On CUDA: the compiled kernel and the torch path share log Z and agree on the loss."""
    batch = {k: v.cuda() for k, v in tied_batch(seed=4, b=300, k=50).items()}
    loss_t, grad_t, stats_t, _ = run(batch, "torch", partition, transform, estimator)
    loss_k, grad_k, stats_k, _ = run(batch, "triton", partition, transform, estimator)
    torch.testing.assert_close(stats_k.beta_logz, stats_t.beta_logz, rtol=0, atol=0)
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_k, grad_t, rtol=1e-5, atol=1e-5)


def test_module_face_passes_the_partition():
    from qrpo.kernels import QRPOLoss

    b = tied_batch(seed=6)
    args = (b["logps"], b["ref_logps"], b["rewards"], b["ref_rewards"])
    kwargs = dict(ref_mask=b["mask"], exclude_index=b["exclude"])
    _, stats = QRPOLoss(beta=0.2, partition="empirical", backend="torch")(*args, **kwargs)
    _, want = qrpo_loss(*args, 0.2, partition="empirical", return_stats=True, **kwargs)
    torch.testing.assert_close(stats.beta_logz, want.beta_logz)
    _, closed = qrpo_loss(*args, 0.2, return_stats=True, **kwargs)
    assert (stats.beta_logz - closed.beta_logz).abs().max() > 1e-3
    with pytest.raises(ValueError, match="partition"):
        QRPOLoss(beta=0.1, partition="exact")
