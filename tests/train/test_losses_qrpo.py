"""QRPO's trainer loss (qrpo/train/losses/qrpo.py, through kernels.qrpo_loss) against its formula
written out in plain Python: quantiles, beta log Z, length-normalised beta, partition forms."""

import math

import pytest
import torch

from qrpo.train.losses import qrpo_trainer_loss
from tests.train.loss_checks import (
    F64,
    assert_metrics_detached,
    assert_no_grad,
    floats,
    grads,
    identity_beta_logz,
    tensor,
)

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
    loss, metrics = qrpo_trainer_loss(logps, ref, rewards, ref_rewards, beta=beta)
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
    loss, metrics = qrpo_trainer_loss(
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
    both, _ = qrpo_trainer_loss(
        torch.cat([chosen, rejected]),
        torch.cat([ref_c, ref_r]),
        torch.cat([r_c, r_r]),
        torch.cat([ref_rewards, ref_rewards]),
        beta=beta,
    )
    loss_c, _ = qrpo_trainer_loss(chosen, ref_c, r_c, ref_rewards, beta=beta)
    loss_r, _ = qrpo_trainer_loss(rejected, ref_r, r_r, ref_rewards, beta=beta)
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
        loss, metrics = qrpo_trainer_loss(
            logps, ref, rewards, ref_rewards, beta=0.5, num_tokens=num_tokens,
            length_normalized=True, ref_mask=mask, partition=partition,
        )  # fmt: skip
        close32(metrics["qrpo/beta_logz"], tensor(expected))
        (g_logps,) = grads(loss, logps)
        close32(g_logps, -2.0 * tensor(betas) * metrics["qrpo/residual"].double())


def test_qrpo_partition_is_a_checked_config_override():
    from qrpo.common.config import ConfigError, build_config
    from qrpo.train.config import TrainConfig

    cfg = build_config(TrainConfig, None, ["loss.partition=finite_k"])
    assert (cfg.loss.partition, TrainConfig().loss.partition) == ("finite_k", "closed_form")
    with pytest.raises(ConfigError, match="'loss.partition'.*did you mean 'finite_k'"):
        build_config(TrainConfig, None, ["loss.partition=finite"])
    with pytest.raises(ConfigError, match="loss.partition=empirical needs loss.estimator"):
        build_config(TrainConfig, None, ["loss.partition=empirical", "loss.estimator=randomized"])


def test_qrpo_gradients_reach_logps_only():
    logps, ref, rewards, ref_rewards = qrpo_inputs()
    loss, _ = qrpo_trainer_loss(logps, ref, rewards, ref_rewards, beta=0.01)
    g_logps, *rest = grads(loss, logps, ref, rewards, ref_rewards)
    assert g_logps is not None and torch.count_nonzero(g_logps) > 0
    assert_no_grad(*rest)
