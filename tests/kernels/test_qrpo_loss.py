"""qrpo_loss against formulas written independently here.

The expected values use python loops over rows and the partition functions in their textbook
(unstabilised) forms at high precision (exact_partition.py), so they share no code with
qrpo/kernels/qrpo.py.
The Triton backend runs through the CPU interpreter (tests/conftest.py).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import scipy.stats
import torch
import triton
import triton.language as tl
from exact_partition import exact_log_z

from qrpo.kernels import qrpo_loss
from qrpo.kernels.qrpo import TRANSFORMS  # a new transform is tested everywhere below
from qrpo.kernels.qrpo_triton import _ndtri

# Triton on CPU tensors needs the interpreter (set by tests/conftest.py when there is no CUDA);
# on a CUDA machine the kernel is compared with the torch backend by the `gpu` test below.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors")
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
ESTIMATORS = ["inclusive", "midrank", "randomized"]


def expected_loss(
    logps,
    ref_logps,
    rewards,
    ref_rewards,
    beta,
    transform,
    *,
    mask=None,
    sigma=None,
    estimator="inclusive",
    exclude=None,
    uniform=None,
    loss_type="squared",
):
    """Row-by-row float64 QRPO loss, plus q and f(q)."""
    out, qs, fqs = [], [], []
    for i in range(len(rewards)):
        r = float(rewards[i])
        refs = [
            float(ref_rewards[i][k])
            for k in range(len(ref_rewards[i]))
            if (mask is None or mask[i][k]) and (exclude is None or k != int(exclude[i]))
        ]
        kv = len(refs)
        less = sum(x < r for x in refs)
        equal = sum(x == r for x in refs)
        if estimator == "inclusive":
            q = (less + equal) / kv
        elif estimator == "midrank":
            q = (less + 0.5 * equal) / kv
        else:
            q = (less + float(uniform[i]) * equal) / kv
        b = float(beta[i]) if hasattr(beta, "__len__") else float(beta)
        s = float(sigma[i]) if sigma is not None else 1.0
        if transform == "identity":
            fq = q
        elif transform == "log":
            fq = math.log(max(q, 1 / kv))
        elif transform in ("normal_icdf", "scaled_normal_icdf"):
            fq = scipy.special.ndtri(min(max(q, 1 / kv), (kv - 1) / kv))
            fq = fq * (s if transform == "scaled_normal_icdf" else 1.0)
        elif transform == "square":
            fq = q * q
        else:
            fq = math.sqrt(q)
        res = fq - b * exact_log_z(transform, b, s) - b * (float(logps[i]) - float(ref_logps[i]))
        out.append(res * res if loss_type == "squared" else abs(res))
        qs.append(q)
        fqs.append(fq)
    return [torch.tensor(x, dtype=torch.float64) for x in (out, qs, fqs)]


def make_batch(b: int = 21, k: int = 12, seed: int = 0, beta_scale: float = 1.0):
    """Integer rewards (many ties), a ragged mask, some excluded columns, per-sample sigma."""
    g = torch.Generator().manual_seed(seed)
    ref_rewards = torch.randint(0, 6, (b, k), generator=g).double()
    rewards = torch.randint(0, 6, (b,), generator=g).double()
    mask = torch.rand(b, k, generator=g) > 0.25
    mask[:, :4] = True  # at least 3 valid entries remain after an exclusion
    exclude = torch.randint(-1, k, (b,), generator=g)
    exclude[::3] = -1
    logps = -50 + 10 * torch.randn(b, generator=g, dtype=torch.float64)
    ref_logps = logps + torch.randn(b, generator=g, dtype=torch.float64) / beta_scale
    sigma = 0.5 + torch.rand(b, generator=g, dtype=torch.float64)
    # Exactly representable in fp32, so fp32 runs see the same numbers as the float64 formula.
    logps, ref_logps = logps.float().double(), ref_logps.float().double()
    return dict(
        logps=logps,
        ref_logps=ref_logps,
        rewards=rewards,
        ref_rewards=ref_rewards,
        mask=mask,
        exclude=exclude,
        sigma=sigma,
    )


def run_loss(batch, beta, backend, dtype=torch.float32, seed=None, **kwargs):
    logps = batch["logps"].detach().to(dtype, copy=True).requires_grad_()
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    loss, stats = qrpo_loss(
        logps,
        batch["ref_logps"].to(dtype),
        batch["rewards"],
        batch["ref_rewards"],
        beta,
        ref_mask=batch["mask"],
        exclude_index=batch["exclude"],
        sigma=batch["sigma"],
        generator=gen,
        return_stats=True,
        backend=backend,
        **kwargs,
    )
    weights = torch.linspace(-1.0, 2.0, len(loss))  # non-uniform upstream gradient
    (loss * weights).sum().backward()
    return loss.detach(), logps.grad, stats, weights


def expected_with_grad(batch, beta, uniform, **kwargs):
    """Expected loss, and its gradient w.r.t. logps by float64 autograd on the same formula."""
    loss, q, fq = expected_loss(
        batch["logps"],
        batch["ref_logps"],
        batch["rewards"],
        batch["ref_rewards"],
        beta,
        mask=batch["mask"],
        sigma=batch["sigma"],
        exclude=batch["exclude"],
        uniform=uniform,
        **kwargs,
    )
    b = torch.as_tensor(beta, dtype=torch.float64).expand(len(q))
    logps = batch["logps"].detach().clone().requires_grad_()
    blz = torch.tensor(
        [
            float(bi) * exact_log_z(kwargs["transform"], float(bi), float(s))
            for bi, s in zip(b, batch["sigma"])
        ],
        dtype=torch.float64,
    )
    residual = fq - blz - b * (logps - batch["ref_logps"])
    ref_loss = residual**2 if kwargs.get("loss_type", "squared") == "squared" else residual.abs()
    weights = torch.linspace(-1.0, 2.0, len(q), dtype=torch.float64)
    (ref_loss * weights).sum().backward()
    return (loss, q, fq), logps.grad, blz, residual.detach()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_loss_and_grad_match_independent_formula(backend, estimator, transform):
    batch = make_batch(seed=1)
    beta = 0.05
    loss, grad, stats, _ = run_loss(
        batch, beta, backend, transform=transform, estimator=estimator, seed=7
    )
    uniform = torch.rand(len(loss), generator=torch.Generator().manual_seed(7))
    (want, q, fq), want_grad, blz, residual = expected_with_grad(
        batch, beta, uniform, transform=transform, estimator=estimator
    )
    torch.testing.assert_close(loss.double(), want, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(grad.double(), want_grad, rtol=2e-5, atol=1e-6)
    torch.testing.assert_close(stats.q.double(), q, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.fq.double(), fq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(stats.beta_logz.double(), blz, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(stats.residual.double(), residual, rtol=2e-5, atol=1e-5)
    torch.testing.assert_close(
        stats.target_log_ratio.double(), (fq - blz) / beta, rtol=1e-5, atol=1e-4
    )
    log_ratio = batch["logps"].float().double() - batch["ref_logps"].float().double()
    torch.testing.assert_close(stats.log_ratio.double(), log_ratio, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("beta", [3e-4, 1e-2, 0.3, 1.0])
@pytest.mark.parametrize("transform", ["identity", "square", "sqrt"])
@pytest.mark.parametrize("loss_type", ["squared", "absolute"])
def test_beta_range_and_loss_type(backend, beta, transform, loss_type):
    # Log-ratios scaled by 1/beta so every residual term stays O(1), as in training.
    batch = make_batch(seed=2, beta_scale=beta)
    loss, grad, _, _ = run_loss(batch, beta, backend, transform=transform, loss_type=loss_type)
    (want, _, _), want_grad, _, _ = expected_with_grad(
        batch, beta, None, transform=transform, loss_type=loss_type
    )
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(grad.double(), want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_beta_tensor_float64_logps(backend):
    """Per-sample beta (length-normalised runs) and float64 log-probs keep float64 gradients."""
    batch = make_batch(seed=3)
    beta = torch.logspace(-3, 0, 21, dtype=torch.float64)
    loss, grad, stats, _ = run_loss(batch, beta, backend, dtype=torch.float64, transform="identity")
    (want, _, _), want_grad, _, _ = expected_with_grad(batch, beta, None, transform="identity")
    assert grad.dtype == torch.float64 and loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), want, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_exclude_index_removes_own_reward():
    """A completion that is itself reference k: excluding k gives the leave-one-out quantile."""
    ref = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    kw = dict(
        logps=torch.zeros(1),
        ref_logps=torch.zeros(1),
        rewards=torch.tensor([3.0]),
        ref_rewards=ref,
        beta=1.0,
        return_stats=True,
    )
    _, with_self = qrpo_loss(**kw)
    _, without = qrpo_loss(**kw, exclude_index=torch.tensor([2]))
    assert with_self.q.item() == pytest.approx(3 / 4)
    assert without.q.item() == pytest.approx(2 / 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_randomized_estimator_is_uniform_under_ties(backend):
    """Rewards drawn from the reference distribution (5 values, heavy ties): randomized q is
    ~Uniform(0, 1) (mean 1/2, small KS distance), the inclusive q is far from it."""
    b, k = 4000, 200
    g = torch.Generator().manual_seed(0)
    probs = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1])
    ref = torch.multinomial(probs, b * k, replacement=True, generator=g).view(b, k).double()
    rewards = torch.multinomial(probs, b, replacement=True, generator=g).double()
    args = (torch.zeros(b), torch.zeros(b), rewards, ref, 0.1)
    gen = torch.Generator().manual_seed(1)
    _, rand = qrpo_loss(
        *args, estimator="randomized", generator=gen, return_stats=True, backend=backend
    )
    _, incl = qrpo_loss(*args, estimator="inclusive", return_stats=True, backend=backend)
    ks_rand = scipy.stats.kstest(rand.q.numpy(), "uniform").statistic
    ks_incl = scipy.stats.kstest(incl.q.numpy(), "uniform").statistic
    assert abs(rand.q.mean().item() - 0.5) < 0.02
    assert ks_rand < 0.03, ks_rand
    assert ks_incl > 0.15, ks_incl


@needs_interpreter
def test_randomized_estimator_is_deterministic_with_seeded_generator():
    batch = make_batch(seed=4)
    runs = {
        (backend, seed): run_loss(batch, 0.1, backend, estimator="randomized", seed=seed)[2].q
        for backend in ("torch", "triton")
        for seed in (5, 6)
    }
    torch.testing.assert_close(runs[("torch", 5)], runs[("triton", 5)])
    assert not torch.equal(runs[("torch", 5)], runs[("torch", 6)])
    q1 = run_loss(batch, 0.1, "torch", estimator="randomized", seed=5)[2].q
    assert torch.equal(q1, runs[("torch", 5)])


@triton.jit
def _ndtri_probe(p_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    p = tl.load(p_ptr + i, mask=i < n, other=0.5)
    tl.store(out_ptr + i, _ndtri(p), mask=i < n)


@pytest.mark.skipif(not (INTERPRETED or torch.cuda.is_available()), reason="no Triton target")
def test_triton_normal_icdf_approximation():
    """Acklam's approximation in the kernel against scipy, across both tails and the centre."""
    p = torch.cat(
        [torch.logspace(-6, -1, 40), torch.linspace(0.1, 0.9, 40), 1 - torch.logspace(-1, -6, 40)]
    ).double()
    p_dev = p.to("cpu" if INTERPRETED else "cuda")
    out = torch.empty_like(p_dev)
    _ndtri_probe[(1,)](p_dev, out, p.numel(), BLOCK=128)
    out = out.cpu()
    want = scipy.special.ndtri(p.numpy())
    # Acklam's published bound is 1.15e-9 relative; the tail near 1 - 1e-6 also loses digits in
    # 1 - p, hence the slightly looser tolerance.
    np.testing.assert_allclose(out.numpy(), want, rtol=1e-8, atol=1e-9)


def _loss_args(**over):
    b, k = 4, 5
    args = dict(
        logps=torch.zeros(b),
        ref_logps=torch.zeros(b),
        rewards=torch.zeros(b),
        ref_rewards=torch.randn(b, k),
        beta=0.1,
    )
    args.update(over)
    return args


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(logps=torch.zeros(4, 1)), "logps"),
        (dict(ref_logps=torch.zeros(3)), "ref_logps"),
        (dict(rewards=torch.zeros(5)), "rewards"),
        (dict(ref_rewards=torch.zeros(3, 5)), "ref_rewards"),
        (dict(ref_rewards=torch.zeros(4, 5, dtype=torch.long)), "ref_rewards"),
        (dict(ref_mask=torch.ones(4, 4, dtype=torch.bool)), "ref_mask"),
        (dict(ref_mask=torch.ones(4, 5)), "ref_mask"),
        (dict(ref_mask=torch.zeros(4, 5, dtype=torch.bool)), "valid reference"),
        (dict(exclude_index=torch.zeros(3, dtype=torch.long)), "exclude_index"),
        (dict(exclude_index=torch.full((4,), 5)), "exclude_index"),
        (dict(beta=0.0), "beta"),
        (dict(beta=torch.tensor([0.1, 0.1, -0.1, 0.1])), "beta"),
        (dict(beta=torch.ones(3)), "beta"),
        (dict(transform="cube"), "transform"),
        (dict(estimator="median"), "estimator"),
        (dict(loss_type="huber"), "loss_type"),
        (dict(backend="cuda"), "backend"),
        (dict(transform="scaled_normal_icdf"), "sigma"),
        (dict(transform="normal_icdf", ref_rewards=torch.randn(4, 2)), "ref_rewards"),
        (dict(rewards=torch.tensor([0.0, float("nan"), 0.0, 0.0])), "rewards"),
        (dict(ref_rewards=torch.full((4, 5), float("nan"))), "ref_rewards"),
    ],
)
def test_bad_arguments_raise(over, match):
    with pytest.raises(ValueError, match=match):
        qrpo_loss(**_loss_args(**over))


def test_masked_nan_reference_rewards_are_ignored():
    """Padding slots may hold NaN: only valid entries are checked and counted."""
    ref = torch.tensor([[1.0, 2.0, float("nan")], [1.0, float("nan"), float("nan")]])
    mask = ~ref.isnan()
    _, stats = qrpo_loss(
        torch.zeros(2),
        torch.zeros(2),
        torch.tensor([1.5, 1.0]),
        ref,
        0.1,
        ref_mask=mask,
        return_stats=True,
    )
    torch.testing.assert_close(stats.q, torch.tensor([0.5, 1.0]))


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize("transform", TRANSFORMS)
def test_cuda_triton_matches_torch(transform, estimator):
    """Compiled fused kernel against the float64 torch path on the same CUDA random stream."""
    batch = {k: v.cuda() for k, v in make_batch(b=300, k=50, seed=5).items()}
    results = {}
    for backend in ("torch", "triton"):
        logps = batch["logps"].float().requires_grad_()
        gen = torch.Generator(device="cuda").manual_seed(0)
        loss, stats = qrpo_loss(
            logps,
            batch["ref_logps"].float(),
            batch["rewards"],
            batch["ref_rewards"],
            torch.full((300,), 0.02, device="cuda"),
            transform=transform,
            ref_mask=batch["mask"],
            sigma=batch["sigma"],
            estimator=estimator,
            exclude_index=batch["exclude"],
            generator=gen,
            return_stats=True,
            backend=backend,
        )
        loss.sum().backward()
        results[backend] = (loss.detach(), logps.grad, stats.q, stats.fq)
    for got, want in zip(results["triton"], results["torch"]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_module_face_matches_functional():
    from qrpo.kernels import QRPOLoss

    batch = make_batch(seed=6)
    args = (batch["logps"], batch["ref_logps"], batch["rewards"], batch["ref_rewards"])
    loss, stats = QRPOLoss(beta=0.1, transform="sqrt", estimator="midrank", backend="torch")(
        *args, ref_mask=batch["mask"]
    )
    want = qrpo_loss(*args, 0.1, transform="sqrt", estimator="midrank", ref_mask=batch["mask"])
    torch.testing.assert_close(loss, want)
    assert set(stats.to_dict()) == {"q", "fq", "beta_logz", "target_log_ratio", "residual",
                                    "log_ratio"}  # fmt: skip
    with pytest.raises(ValueError, match="transform"):
        QRPOLoss(beta=0.1, transform="cube")
