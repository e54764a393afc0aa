"""Tests for train/losses: each loss against its formula written out here in plain Python.

Expected values are computed per example with `math` on Python floats, and gradients are the
hand-derived analytic derivatives of each formula, never the same tensor code as the losses.
"""

import math

import pytest
import torch

from train.losses import (
    LOSSES,
    dpo_loss,
    dro_loss,
    kto_loss,
    qrpo_loss,
    rebel_loss,
    rpo_partition_loss,
    rpo_partition_values,
    sft_loss,
    simpo_loss,
    zscore,
)

F64 = torch.float64


# --- scalar references -------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def identity_beta_logz(beta: float) -> float:
    """beta * log(beta * (exp(1/beta) - 1)), without forming exp(1/beta)."""
    return beta * (math.log(beta) + 1.0 / beta + math.log1p(-math.exp(-1.0 / beta)))


# --- helpers -------------------------------------------------------------------------------------


def policy_logps(n: int) -> torch.Tensor:
    return (-1.0 - 60.0 * torch.rand(n, dtype=F64)).requires_grad_()


def ref_of(logps: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """Reference log-probs a few nats from the policy's (tests mark them requires_grad to show
    that they receive no gradient)."""
    return (logps.detach() + scale * torch.randn(logps.shape, dtype=F64)).to(logps.dtype)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple:
    return torch.autograd.grad(loss.sum(), inputs, allow_unused=True)


def floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().tolist()]


def tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def assert_no_grad(*gs) -> None:
    for g in gs:
        assert g is None or torch.count_nonzero(g) == 0


def assert_metrics_detached(metrics: dict) -> None:
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor), name
        assert not value.requires_grad, name


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


# --- QRPO (through kernels.qrpo_loss) -----------------------------------------------------------


def qrpo_inputs(batch: int = 8, k: int = 5):
    """float32 inputs; discrete rewards so that ties with the reference rewards occur."""
    logps = (-5.0 - 40.0 * torch.rand(batch)).requires_grad_()
    ref = (logps.detach() + torch.randn(batch)).requires_grad_()
    rewards = (torch.randint(0, 5, (batch,)) / 4.0).requires_grad_()
    ref_rewards = (torch.randint(0, 5, (batch, k)) / 4.0).requires_grad_()
    return logps, ref, rewards, ref_rewards


def qrpo_expected(logps, ref, rewards, ref_rewards, betas):
    """Per-sample identity-transform QRPO with inclusive quantiles, in float64 Python."""
    out = {"loss": [], "q": [], "beta_logz": [], "target": [], "residual": [], "grad": []}
    for lp, rl, r, refs, beta in zip(
        floats(logps), floats(ref), floats(rewards), ref_rewards.tolist(), betas
    ):
        q = sum(1 for x in refs if x <= r) / len(refs)
        beta_logz = identity_beta_logz(beta)
        residual = q - beta_logz - beta * (lp - rl)
        out["q"].append(q)
        out["beta_logz"].append(beta_logz)
        out["target"].append((q - beta_logz) / beta)
        out["residual"].append(residual)
        out["loss"].append(residual**2)
        out["grad"].append(-2.0 * beta * residual)
    return {name: tensor(values) for name, values in out.items()}


def close32(actual: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(actual.double(), expected, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("beta", [1e-3, 0.05, 1.0])  # 1.0: log1p(-exp(-1/beta)) matters
def test_qrpo_loss_matches_formula(beta):
    logps, ref, rewards, ref_rewards = qrpo_inputs()
    assert (ref_rewards == rewards[:, None]).any()  # ties exercise the inclusive rule
    loss, metrics = qrpo_loss(logps, ref, rewards, ref_rewards, beta=beta)
    exp = qrpo_expected(logps, ref, rewards, ref_rewards, [beta] * 8)

    assert loss.dtype == torch.float32 and loss.shape == (8,)
    close32(loss, exp["loss"])
    for name in ("q", "beta_logz", "target", "residual"):
        close32(metrics[f"qrpo/{name}"], exp[name])
    close32(metrics["qrpo/f_q"], exp["q"])
    close32(metrics["qrpo/log_ratio"], logps.detach().double() - ref.detach().double())
    close32(metrics["qrpo/beta"], torch.full((8,), beta, dtype=F64))
    (g_logps,) = grads(loss, logps)
    close32(g_logps, exp["grad"])
    assert_metrics_detached(metrics)


def test_qrpo_length_normalized_beta_is_clamped():
    beta, max_beta = 2.0, 0.1
    logps, ref, rewards, ref_rewards = qrpo_inputs(batch=7)
    num_tokens = torch.tensor([0, 1, 5, 20, 40, 100, 1000])
    loss, metrics = qrpo_loss(
        logps,
        ref,
        rewards,
        ref_rewards,
        beta=beta,
        num_tokens=num_tokens,
        length_normalized=True,
        max_beta=max_beta,
    )
    betas = [min(beta / max(n, 1), max_beta) for n in num_tokens.tolist()]
    assert betas[:4] == [0.1] * 4 and betas[-1] == 0.002
    exp = qrpo_expected(logps, ref, rewards, ref_rewards, betas)

    close32(metrics["qrpo/beta"], tensor(betas))
    close32(metrics["qrpo/beta_logz"], exp["beta_logz"])
    close32(loss, exp["loss"])
    (g_logps,) = grads(loss, logps)
    close32(g_logps, exp["grad"])


def test_qrpo_pairs_are_pointwise_samples():
    beta = 0.02
    chosen, ref_c, r_c, ref_rewards = qrpo_inputs(batch=4)
    rejected, ref_r, r_r, _ = qrpo_inputs(batch=4)
    both, _ = qrpo_loss(
        torch.cat([chosen, rejected]),
        torch.cat([ref_c, ref_r]),
        torch.cat([r_c, r_r]),
        torch.cat([ref_rewards, ref_rewards]),
        beta=beta,
    )
    loss_c, _ = qrpo_loss(chosen, ref_c, r_c, ref_rewards, beta=beta)
    loss_r, _ = qrpo_loss(rejected, ref_r, r_r, ref_rewards, beta=beta)
    torch.testing.assert_close(both, torch.cat([loss_c, loss_r]))
    # Row loss of the reference code = mean of its two samples; the batch mean agrees.
    torch.testing.assert_close(both.mean(), ((loss_c + loss_r) / 2).mean())


def test_qrpo_partition_forms_reach_the_target():
    """loss.partition flows through train's wrapper: per sample, with length-normalised beta and
    a ragged mask, beta_logz is beta_eff * log Z_K (grid j/K, K = the row's valid count) or the
    empirical mean over its reference rewards; the gradient keeps its form -2 beta residual."""
    logps, ref, rewards, ref_rewards = qrpo_inputs(batch=6, k=5)
    mask = torch.ones(6, 5, dtype=torch.bool)
    mask[1, 3:] = False
    mask[4, 0] = False
    num_tokens = torch.tensor([3, 10, 20, 50, 7, 40])
    betas = [min(0.5 / n, 0.1) for n in num_tokens.tolist()]
    valid = [[x for x, m in zip(row, ms) if m] for row, ms in zip(ref_rewards.tolist(), mask)]
    want = {
        "finite_k": [
            b * math.log(sum(math.exp(j / len(v) / b) for j in range(len(v) + 1)) / (len(v) + 1))
            for b, v in zip(betas, valid)
        ],
        "empirical": [
            b * math.log(sum(math.exp(sum(y <= x for y in v) / len(v) / b) for x in v) / len(v))
            for b, v in zip(betas, valid)
        ],
    }
    for partition, expected in want.items():
        loss, metrics = qrpo_loss(
            logps, ref, rewards, ref_rewards, beta=0.5, num_tokens=num_tokens,
            length_normalized=True, ref_mask=mask, partition=partition,
        )  # fmt: skip
        close32(metrics["qrpo/beta_logz"], tensor(expected))
        (g_logps,) = grads(loss, logps)
        close32(g_logps, -2.0 * tensor(betas) * metrics["qrpo/residual"].double())


def test_qrpo_partition_is_a_checked_config_override():
    from common.config import ConfigError, build_config
    from train.config import TrainConfig

    cfg = build_config(TrainConfig, None, ["loss.partition=finite_k"])
    assert (cfg.loss.partition, TrainConfig().loss.partition) == ("finite_k", "closed_form")
    with pytest.raises(ConfigError, match="'loss.partition'.*did you mean 'finite_k'"):
        build_config(TrainConfig, None, ["loss.partition=finite"])
    with pytest.raises(ConfigError, match="loss.partition=empirical needs loss.estimator"):
        build_config(TrainConfig, None, ["loss.partition=empirical", "loss.estimator=randomized"])


def test_qrpo_gradients_reach_logps_only():
    logps, ref, rewards, ref_rewards = qrpo_inputs()
    loss, _ = qrpo_loss(logps, ref, rewards, ref_rewards, beta=0.01)
    g_logps, *rest = grads(loss, logps, ref, rewards, ref_rewards)
    assert g_logps is not None and torch.count_nonzero(g_logps) > 0
    assert_no_grad(*rest)


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
    return LOSSES[name](*args, **kw)


@pytest.mark.parametrize("name", ["sft", "dpo", "simpo", "rebel", "kto", "dro", "rpo_partition"])
def test_low_precision_inputs_give_float32_losses(name):
    loss, metrics = bf16_call(name)
    assert loss.dtype == torch.float32 and loss.shape == (4,)
    assert torch.isfinite(loss).all()
    assert_metrics_detached(metrics)


def test_registry_names():
    assert set(LOSSES) == {"sft", "qrpo", "dpo", "simpo", "rebel", "kto", "dro", "rpo_partition"}
