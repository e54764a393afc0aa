"""SimPO: Simple Preference Optimization with a reference-free reward (Meng et al. 2024,
arXiv 2405.14734)."""

import torch.nn.functional as F
from torch import Tensor

from qrpo.train.losses.common import as_float, token_counts
from qrpo.train.losses.spec import Algorithm, LossInputs, chosen_and_rejected, register_algorithm


def simpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    chosen_num_tokens: Tensor,
    rejected_num_tokens: Tensor,
    *,
    beta: float,
    gamma: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """SimPO loss, paper eq. 6:

        loss = -log sigmoid(beta/|y_w| * log pi(y_w|x) - beta/|y_l| * log pi(y_l|x) - gamma)

    i.e. the implicit reward is beta times the token-mean log-prob; no reference model. Token
    counts are clamped to >= 1. Paper settings: gamma/beta = 0.5, beta in {2, 2.5, 10}.

    Args:
        chosen_logps, rejected_logps: [B] summed policy log-probs.
        chosen_num_tokens, rejected_num_tokens: [B] completion lengths |y_w|, |y_l|.
        beta: reward scale.
        gamma: target reward margin (note: gamma, not gamma/beta).

    Returns:
        loss [B] and per-example metrics: "rewards/chosen" = beta * pc / |y_w|,
        "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen" and
        "logps/rejected" (summed log-probs).
    """
    pc, pr = as_float(chosen_logps), as_float(rejected_logps)
    chosen_rewards = beta * pc / token_counts(chosen_num_tokens, pc)
    rejected_rewards = beta * pr / token_counts(rejected_num_tokens, pr)
    loss = -F.logsigmoid(chosen_rewards - rejected_rewards - gamma)

    chosen_rewards, rejected_rewards = chosen_rewards.detach(), rejected_rewards.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(loss.dtype),
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }
    return loss, metrics


def _simpo(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    lp, n = x.logps, x.batch.num_tokens
    return simpo_loss(lp[0::2], lp[1::2], n[0::2], n[1::2], beta=cfg.beta, gamma=cfg.gamma)


register_algorithm(
    Algorithm(
        "simpo",
        _simpo,
        pairs=True,
        needs_reference=False,
        build=chosen_and_rejected,
        fused_head=True,
    )
)
