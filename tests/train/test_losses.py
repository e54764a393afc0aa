"""Tests for qrpo/train/losses: each loss against its formula written out here in plain Python.

Expected values are computed per example with `math` on Python floats, and gradients are the
hand-derived analytic derivatives of each formula, never the same tensor code as the losses.
QRPO's are in test_losses_qrpo.py; the algorithm specs' in test_algorithms.py.
"""

import math

import pytest
import torch

from qrpo.train.losses import (
    dpo_loss,
    dro_loss,
    kto_loss,
    rebel_loss,
    rpo_partition_loss,
    rpo_partition_values,
    sft_loss,
    simpo_loss,
    zscore,
)
from tests.train.loss_checks import (
    F64,
    assert_metrics_detached,
    assert_no_grad,
    floats,
    grads,
    log_sigmoid,
    policy_logps,
    ref_of,
    sigmoid,
    tensor,
)

FORMULAS = {
    "sft": sft_loss,
    "dpo": dpo_loss,
    "simpo": simpo_loss,
    "rebel": rebel_loss,
    "kto": kto_loss,
    "dro": dro_loss,
    "rpo_partition": rpo_partition_loss,
}


# --- SFT -----------------------------------------------------------------------------------------


def test_sft_loss_is_summed_nll_with_token_mean_metric():
    logps = policy_logps(5)
    num_tokens = torch.tensor([3, 7, 1, 12, 4])
    loss, metrics = sft_loss(logps, num_tokens)

    torch.testing.assert_close(loss, tensor([-v for v in floats(logps)]))
    (g,) = grads(loss, logps)
    torch.testing.assert_close(g, torch.full_like(g, -1.0))
    nll_per_token = -sum(floats(logps)) / 27
    torch.testing.assert_close(metrics["sft/nll_per_token"], torch.tensor(nll_per_token, dtype=F64))
    assert_metrics_detached(metrics)


# --- DPO -----------------------------------------------------------------------------------------


def test_dpo_loss_hand_worked():
    """Two pairs, beta = 0.1, worked out by hand.

    Pair 0: policy chosen -10, rejected -14; reference chosen -11, rejected -12.
        chosen reward   = 0.1 * (-10 + 11) =  0.1
        rejected reward = 0.1 * (-14 + 12) = -0.2
        margin = 0.3, loss = -log sigmoid(0.3) = log(1 + exp(-0.3)) = 0.5543552
    Pair 1: policy chosen -20, rejected -15; reference chosen -18, rejected -16.
        chosen reward   = 0.1 * (-20 + 18) = -0.2
        rejected reward = 0.1 * (-15 + 16) =  0.1
        margin = -0.3, loss = log(1 + exp(0.3)) = 0.8543552 (= 0.5543552 + 0.3)
    """
    loss, metrics = dpo_loss(
        torch.tensor([-10.0, -20.0]),
        torch.tensor([-14.0, -15.0]),
        torch.tensor([-11.0, -18.0]),
        torch.tensor([-12.0, -16.0]),
        beta=0.1,
    )
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss, torch.tensor([0.5543552, 0.8543552]))
    torch.testing.assert_close(metrics["rewards/chosen"], torch.tensor([0.1, -0.2]))
    torch.testing.assert_close(metrics["rewards/rejected"], torch.tensor([-0.2, 0.1]))
    torch.testing.assert_close(metrics["rewards/margins"], torch.tensor([0.3, -0.3]))
    torch.testing.assert_close(metrics["rewards/accuracies"], torch.tensor([1.0, 0.0]))


def test_dpo_loss_values_and_gradients():
    beta = 0.1
    pc, pr = policy_logps(7), policy_logps(7)
    rc, rr = ref_of(pc).requires_grad_(), ref_of(pr).requires_grad_()
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=beta)

    expected, d_pc, d_pr = [], [], []
    for a, b, c, d in zip(floats(pc), floats(pr), floats(rc), floats(rr)):
        h = (a - c) - (b - d)
        expected.append(-log_sigmoid(beta * h))
        d_pc.append(
            -beta * sigmoid(-beta * h)
        )  # d/dh -log sigmoid(beta h) = -beta sigmoid(-beta h)
        d_pr.append(beta * sigmoid(-beta * h))
    torch.testing.assert_close(loss, tensor(expected))
    g_pc, g_pr, g_rc, g_rr = grads(loss, pc, pr, rc, rr)
    torch.testing.assert_close(g_pc, tensor(d_pc))
    torch.testing.assert_close(g_pr, tensor(d_pr))
    assert_no_grad(g_rc, g_rr)

    chosen = [beta * (a - c) for a, c in zip(floats(pc), floats(rc))]
    rejected = [beta * (b - d) for b, d in zip(floats(pr), floats(rr))]
    torch.testing.assert_close(metrics["rewards/chosen"], tensor(chosen))
    torch.testing.assert_close(metrics["rewards/rejected"], tensor(rejected))
    torch.testing.assert_close(
        metrics["rewards/margins"], tensor([c - r for c, r in zip(chosen, rejected)])
    )
    torch.testing.assert_close(
        metrics["rewards/accuracies"], tensor([float(c > r) for c, r in zip(chosen, rejected)])
    )
    torch.testing.assert_close(metrics["logps/chosen"], pc.detach())
    assert_metrics_detached(metrics)


# --- SimPO ---------------------------------------------------------------------------------------


def test_simpo_loss_values_and_gradients():
    beta, gamma = 2.5, 1.25
    pc, pr = policy_logps(6), policy_logps(6)
    nc = torch.tensor([10, 3, 25, 1, 40, 7])
    nr = torch.tensor([12, 30, 2, 8, 1, 0])  # 0 tokens: clamped to 1
    loss, metrics = simpo_loss(pc, pr, nc, nr, beta=beta, gamma=gamma)

    expected, d_pc, d_pr, margins = [], [], [], []
    for a, b, n_c, n_r in zip(floats(pc), floats(pr), nc.tolist(), nr.tolist()):
        n_c, n_r = max(n_c, 1), max(n_r, 1)
        z = beta * a / n_c - beta * b / n_r - gamma
        expected.append(-log_sigmoid(z))
        d_pc.append(-sigmoid(-z) * beta / n_c)
        d_pr.append(sigmoid(-z) * beta / n_r)
        margins.append(beta * a / n_c - beta * b / n_r)
    torch.testing.assert_close(loss, tensor(expected))
    g_pc, g_pr = grads(loss, pc, pr)
    torch.testing.assert_close(g_pc, tensor(d_pc))
    torch.testing.assert_close(g_pr, tensor(d_pr))
    torch.testing.assert_close(metrics["rewards/margins"], tensor(margins))
    torch.testing.assert_close(
        metrics["rewards/chosen"], tensor([beta * a / n for a, n in zip(floats(pc), nc.tolist())])
    )
    assert_metrics_detached(metrics)


# --- REBEL ---------------------------------------------------------------------------------------


def test_rebel_loss_values_and_gradients():
    beta = 0.01
    pc, pr = policy_logps(6), policy_logps(6)
    rc, rr = ref_of(pc).requires_grad_(), ref_of(pr).requires_grad_()
    r_w = torch.rand(6, dtype=F64).requires_grad_()
    r_l = torch.rand(6, dtype=F64).requires_grad_()
    loss, metrics = rebel_loss(pc, pr, rc, rr, r_w, r_l, beta=beta)

    expected, d_pc, residuals = [], [], []
    for a, b, c, d, w, lo in zip(
        floats(pc), floats(pr), floats(rc), floats(rr), floats(r_w), floats(r_l)
    ):
        residual = (w - lo) / beta - ((a - c) - (b - d))
        expected.append(residual**2)
        d_pc.append(-2.0 * residual)
        residuals.append(residual)
    torch.testing.assert_close(loss, tensor(expected))
    g_pc, g_pr, *rest = grads(loss, pc, pr, rc, rr, r_w, r_l)
    torch.testing.assert_close(g_pc, tensor(d_pc))
    torch.testing.assert_close(g_pr, -tensor(d_pc))
    assert_no_grad(*rest)
    torch.testing.assert_close(metrics["rebel/residual"], tensor(residuals))
    assert_metrics_detached(metrics)


# --- KTO -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kl_source", ["mismatched", "batch", "batch_negative"])
def test_kto_loss_values_and_gradients(kl_source):
    beta, w_d, w_u = 0.1, 1.0, 1.33
    logps = policy_logps(8)
    shift = -3.0 if kl_source == "batch_negative" else 3.0  # mean ratio < 0: z0 clamps to 0
    ref = (logps.detach() - shift + torch.randn(8, dtype=F64)).requires_grad_()
    desirable = torch.tensor([True, False, True, True, False, False, True, False])
    kl_logps = kl_ref = None
    if kl_source == "mismatched":
        kl_logps = policy_logps(8)
        kl_ref = kl_logps.detach() - 2.0 + torch.randn(8, dtype=F64)

    loss, metrics = kto_loss(
        logps,
        ref,
        desirable,
        beta=beta,
        kl_logps=kl_logps,
        kl_ref_logps=kl_ref,
        desirable_weight=w_d,
        undesirable_weight=w_u,
    )

    ratios = [a - b for a, b in zip(floats(logps), floats(ref))]
    if kl_source == "mismatched":
        kls = [a - b for a, b in zip(floats(kl_logps), floats(kl_ref))]
    else:
        kls = ratios
    z0 = max(0.0, sum(kls) / len(kls))
    if kl_source == "batch_negative":
        assert z0 == 0.0
    expected, d_logps = [], []
    for ratio, good in zip(ratios, desirable.tolist()):
        if good:
            s = sigmoid(beta * (ratio - z0))
            expected.append(w_d * (1.0 - s))
            d_logps.append(-w_d * beta * s * (1.0 - s))  # z0 is a constant
        else:
            s = sigmoid(beta * (z0 - ratio))
            expected.append(w_u * (1.0 - s))
            d_logps.append(w_u * beta * s * (1.0 - s))
    torch.testing.assert_close(loss, tensor(expected))
    torch.testing.assert_close(metrics["kto/kl"], torch.tensor(z0, dtype=F64))

    inputs = [logps, ref] + ([kl_logps] if kl_logps is not None else [])
    g_logps, *rest = grads(loss, *inputs)
    torch.testing.assert_close(g_logps, tensor(d_logps))
    assert_no_grad(*rest)

    chosen = [beta * r for r, good in zip(ratios, desirable.tolist()) if good]
    rejected = [beta * r for r, good in zip(ratios, desirable.tolist()) if not good]
    torch.testing.assert_close(
        metrics["rewards/chosen"], torch.tensor(sum(chosen) / len(chosen), dtype=F64)
    )
    torch.testing.assert_close(
        metrics["rewards/rejected"], torch.tensor(sum(rejected) / len(rejected), dtype=F64)
    )
    assert metrics["count/chosen"].item() == len(chosen)
    assert_metrics_detached(metrics)


def test_kto_metrics_without_undesirable_examples_are_finite():
    logps = policy_logps(4)
    loss, metrics = kto_loss(logps, ref_of(logps), torch.ones(4, dtype=torch.bool), beta=0.1)
    assert torch.isfinite(loss).all()
    assert all(torch.isfinite(v).all() for v in metrics.values())
    assert metrics["rewards/rejected"].item() == 0.0
    assert metrics["count/rejected"].item() == 0.0


# --- DRO -----------------------------------------------------------------------------------------


def test_dro_loss_values_and_gradient_separation():
    tau = 0.7
    logps = policy_logps(6)
    ref = ref_of(logps).requires_grad_()
    rewards = torch.randn(6, dtype=F64).requires_grad_()
    values = torch.randn(6, dtype=F64).requires_grad_()
    loss, metrics = dro_loss(logps, ref, rewards, values, tau=tau)

    expected, d_logps, d_values, residuals = [], [], [], []
    for lp, rl, r, v in zip(floats(logps), floats(ref), floats(rewards), floats(values)):
        ratio = lp - rl
        policy_part = -lp * (r - v) + 0.5 * tau * ratio**2
        value_part = 0.5 * (r - v - tau * ratio) ** 2
        expected.append(policy_part + value_part)
        # Policy surrogate alone moves logps: -(r - V) + tau * ratio; had the value loss leaked
        # into logps it would add -tau * (r - V - tau * ratio).
        d_logps.append(-(r - v) + tau * ratio)
        # Value loss alone moves V: -(r - V - tau * ratio); had the surrogate leaked it would
        # add +logps.
        d_values.append(-(r - v - tau * ratio))
        residuals.append(r - v - tau * ratio)
    torch.testing.assert_close(loss, tensor(expected))
    g_logps, g_values, g_ref, g_rewards = grads(loss, logps, values, ref, rewards)
    torch.testing.assert_close(g_logps, tensor(d_logps))
    torch.testing.assert_close(g_values, tensor(d_values))
    assert_no_grad(g_ref, g_rewards)
    torch.testing.assert_close(metrics["dro/residual"], tensor(residuals))
    torch.testing.assert_close(metrics["dro/value"], values.detach())
    assert_metrics_detached(metrics)


# --- reward partitioning -------------------------------------------------------------------------


def test_rpo_partition_loss_values_and_gradients():
    tau = 5.0
    logps = policy_logps(6)
    ref = ref_of(logps).requires_grad_()
    rewards = torch.randn(6, dtype=F64)
    values = torch.randn(6, dtype=F64).requires_grad_()
    num_tokens = torch.tensor([5, 17, 1, 60, 9, 0])
    loss, metrics = rpo_partition_loss(logps, ref, rewards, num_tokens, values, tau=tau)

    expected, d_logps = [], []
    for lp, rl, r, v, n in zip(
        floats(logps), floats(ref), floats(rewards), floats(values), num_tokens.tolist()
    ):
        n = max(n, 1)
        residual = (lp - rl) / n - (r - v) / tau
        expected.append(0.5 * residual**2)
        d_logps.append(residual / n)
    torch.testing.assert_close(loss, tensor(expected))
    g_logps, g_ref, g_values = grads(loss, logps, ref, values)
    torch.testing.assert_close(g_logps, tensor(d_logps))
    assert_no_grad(g_ref, g_values)
    assert_metrics_detached(metrics)


def test_rpo_partition_values_match_direct_sum():
    tau = 5.0
    group_index = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2, 0])
    mean_token_logps = -3.0 * torch.rand(10, dtype=F64)
    rewards = torch.randn(10, dtype=F64)
    values = rpo_partition_values(mean_token_logps, rewards, group_index, 4, tau=tau)

    expected = []
    for g in range(3):
        total = 0.0
        for m, r, i in zip(floats(mean_token_logps), floats(rewards), group_index.tolist()):
            if i == g:
                total += math.exp(m) * math.exp(r / tau)
        expected.append(tau * math.log(total))
    torch.testing.assert_close(values[:3], tensor(expected))
    assert values[3].item() == -math.inf  # a prompt without responses


def test_rpo_partition_values_stable_for_tiny_tau():
    tau = 1e-4
    group_index = torch.tensor([0, 1, 0, 1, 0])
    mean_token_logps = torch.tensor([-0.5, -2.0, -1.0, -0.1, -3.0])
    rewards = torch.tensor([1.5, -0.3, 2.0, -0.2, 1.9])  # r / tau up to 2e4: exp overflows
    values = rpo_partition_values(mean_token_logps, rewards, group_index, 2, tau=tau)

    assert values.dtype == torch.float32
    assert torch.isfinite(values).all()
    expected = []
    for g in range(2):
        a = [
            m + r / tau
            for m, r, i in zip(floats(mean_token_logps), floats(rewards), group_index.tolist())
            if i == g
        ]
        top = max(a)
        expected.append(tau * (top + math.log(sum(math.exp(x - top) for x in a))))
    torch.testing.assert_close(values, torch.tensor(expected, dtype=torch.float32))
    # As tau -> 0 the value tends to the best reward of the prompt.
    torch.testing.assert_close(values, torch.tensor([2.0, -0.2]), atol=1e-3, rtol=0)


def test_zscore_population_std():
    rewards = torch.tensor([1.0, 2.0, 4.0, 7.0])
    z = zscore(rewards)
    mean = sum(rewards.tolist()) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards.tolist()) / 4)
    torch.testing.assert_close(z, torch.tensor([(r - mean) / std for r in rewards.tolist()]))
    torch.testing.assert_close(zscore(torch.full((3,), 2.5)), torch.zeros(3))


# --- dtypes --------------------------------------------------------------------------------------


def bf16_call(name: str):
    b = 4
    lp = lambda: (-1.0 - 30.0 * torch.rand(b)).to(torch.bfloat16)
    n = torch.tensor([3, 8, 1, 20])
    r = lambda: torch.randn(b).to(torch.bfloat16)
    kwargs = {
        "sft": ((lp(), n), {}),
        "dpo": ((lp(), lp(), lp(), lp()), {"beta": 0.1}),
        "simpo": ((lp(), lp(), n, n), {"beta": 2.0, "gamma": 1.0}),
        "rebel": ((lp(), lp(), lp(), lp(), r(), r()), {"beta": 0.01}),
        "kto": ((lp(), lp(), torch.tensor([True, False, True, False])), {"beta": 0.1}),
        "dro": ((lp(), lp(), r(), r()), {"tau": 1.0}),
        "rpo_partition": ((lp(), lp(), r(), n, r()), {"tau": 5.0}),
    }
    args, kw = kwargs[name]
    return FORMULAS[name](*args, **kw)


@pytest.mark.parametrize("name", ["sft", "dpo", "simpo", "rebel", "kto", "dro", "rpo_partition"])
def test_low_precision_inputs_give_float32_losses(name):
    loss, metrics = bf16_call(name)
    assert loss.dtype == torch.float32 and loss.shape == (4,)
    assert torch.isfinite(loss).all()
    assert_metrics_detached(metrics)
