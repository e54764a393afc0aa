"""qrpo.evaluate.partition_bandit: the exact optimum, the K = infinity case of the issue, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import scipy.special
import torch

from qrpo.evaluate import partition_bandit as pb
from qrpo.kernels import log_partition

BETA = 0.1


def target_of(form: str, variant: str, estimator: str, k: int):
    cfg = pb.BanditConfig(beta=BETA, plot=False)
    rewards = torch.tensor(pb.REWARDS[variant], dtype=torch.float64)
    counts, prob = pb.reference_sets(k)
    q = pb.arm_quantiles(rewards, counts, estimator)
    fq = q  # identity
    log_z = pb.form_log_z(form, cfg, estimator, k, counts, rewards)
    return fq, fq - BETA * log_z[:, None], prob


@pytest.mark.parametrize("k", [1, 3, 5])
def test_reference_sets_are_every_multiset_with_its_probability(k):
    counts, prob = pb.reference_sets(k)
    assert len(prob) == math.comb(k + 7, 7)
    assert (counts.sum(1) == k).all()
    assert prob.sum().item() == pytest.approx(1.0, abs=1e-14)
    one_arm = (counts[:, 7] == k).nonzero()[0, 0]  # every draw the last arm
    assert prob[one_arm].item() == pytest.approx(pb.REF_PROBS[7] ** k, rel=1e-12)


@pytest.mark.parametrize("variant", ["distinct", "graded"])
def test_exact_distribution_empirical_form_is_exact_and_closed_form_is_not(variant):
    """The issue's bandit (K = inf): with the empirical form the fitted policy is the target
    pi* = pi_ref exp(q / beta) / Z_disc; with the closed form every arm's residual at pi* is
    delta = beta * log(Z_disc / Z_f) and the fitted policy is far from pi*."""
    fq, target_emp, _ = target_of("empirical", variant, "inclusive", 0)
    _, target_closed, _ = target_of("closed_form", variant, "inclusive", 0)
    log_ref = torch.tensor(pb.REF_PROBS, dtype=torch.float64).log()
    pi_star = torch.softmax(log_ref + fq / BETA, 1)
    log_z_disc = torch.logsumexp(log_ref + fq / BETA, 1)

    fit_emp, grad_emp = pb.fit_policies(target_emp, BETA)
    fit_closed, grad_closed = pb.fit_policies(target_closed, BETA)
    assert grad_emp.max() < 1e-9 and grad_closed.max() < 1e-9
    assert 0.5 * (fit_emp - pi_star).abs().sum() < 1e-9
    assert 0.5 * (fit_closed - pi_star).abs().sum() > 0.05

    residual = target_closed - BETA * (pi_star / log_ref.exp()).log()
    delta = BETA * (log_z_disc - log_partition("identity", BETA))
    torch.testing.assert_close(residual, delta[:, None].expand_as(residual), rtol=0, atol=1e-12)


def lbfgs_fit(target: torch.Tensor, seed: int, start: torch.Tensor | None) -> torch.Tensor:
    """Softmax logits minimising the summed L_S by L-BFGS from `start` or a random one."""
    g = torch.Generator().manual_seed(seed)
    if start is None:
        start = 3 * torch.randn(target.shape, dtype=torch.float64, generator=g)
    theta = start.clone().requires_grad_()
    opt = torch.optim.LBFGS(
        [theta], max_iter=400, tolerance_grad=1e-12, tolerance_change=1e-20,
        line_search_fn="strong_wolfe",
    )  # fmt: skip

    def closure():
        opt.zero_grad()
        loss = pb.expected_loss(theta, target, BETA).sum() / BETA**2
        loss.backward()
        return loss

    opt.step(closure)
    return theta.detach()


def test_lambert_w0_against_scipy():
    x = torch.cat([torch.linspace(-1 / math.e, 0, 200), torch.logspace(-8, 3, 300)]).double()
    want = torch.from_numpy(scipy.special.lambertw(x.numpy()).real)
    torch.testing.assert_close(pb.lambert_w0(x), want, rtol=1e-12, atol=1e-7)  # sqrt at -1/e
    inner = x > -1 / math.e + 1e-6
    torch.testing.assert_close(pb.lambert_w0(x)[inner], want[inner], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("variant,estimator,form", [
    ("distinct", "inclusive", "finite_k"),
    ("graded", "midrank", "empirical"),
])  # fmt: skip
def test_exact_fit_matches_a_generic_optimiser(variant, estimator, form):
    """The Lambert-W solution is the minimiser: L-BFGS from the target and from random starts on
    a few reference sets never finds a lower loss (L_S has several local minima when delta < 0,
    where L-BFGS often stops higher), and where delta > 0 (one minimum) it reaches the same
    policy from the target."""
    _, target, _ = target_of(form, variant, estimator, 3)
    target = target[torch.linspace(0, len(target) - 1, 7).long()]
    fitted, grad = pb.fit_policies(target, BETA)
    assert grad.max() < 1e-9
    exact_loss = pb.expected_loss(fitted.log(), target, BETA)
    log_ref = torch.tensor(pb.REF_PROBS, dtype=torch.float64).log()
    starts = [log_ref + target / BETA, None, None]
    for seed, start in enumerate(starts):
        theta = lbfgs_fit(target, seed, start)
        assert (exact_loss <= pb.expected_loss(theta, target, BETA) + 1e-12).all()
        if start is not None:
            positive = torch.logsumexp(log_ref + target / BETA, 1) > 0  # delta > 0
            assert positive.any()
            got = torch.softmax(theta, 1)[positive]
            torch.testing.assert_close(got, fitted[positive], rtol=0, atol=1e-6)


def test_cli_writes_the_table(tmp_path):
    pb.main([f"out_dir={tmp_path}", "ks=[0,2]", "rewards=[graded]", "estimators=[inclusive]"])
    table = (tmp_path / "partition_bandit.md").read_text().splitlines()
    rows = [line for line in table if line.startswith("| graded")]
    assert len(rows) == 2 * len(pb.FORMS)
    results = json.loads((tmp_path / "partition_bandit.json").read_text())["results"]
    exact = {r["form"]: r for r in results if r["k"] == 0}
    assert exact["empirical"]["tv_mean"] < 1e-9 < exact["closed_form"]["tv_mean"]
    assert all(r["max_grad"] < 1e-8 for r in results)
    assert (tmp_path / "partition_bandit.png").stat().st_size > 0
