"""DPO: Direct Preference Optimization (Rafailov et al. 2023, arXiv 2305.18290)."""

import torch.nn.functional as F
from torch import Tensor

from qrpo.train.losses.common import as_float
from qrpo.train.losses.spec import Algorithm, LossInputs, chosen_and_rejected, register_algorithm


def dpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DPO loss, paper eq. 7:

        h    = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        loss = -log sigmoid(beta * h)

    Log-probs are summed over completion tokens. The reference log-probs are treated as
    constants (detached).

    Args:
        chosen_logps, rejected_logps: [B] policy log-probs of the chosen / rejected completions.
        ref_chosen_logps, ref_rejected_logps: [B] reference log-probs of the same completions.
        beta: KL coefficient (paper grid {0.01, 0.03, 0.1}).

    Returns:
        loss [B] and per-example metrics: "rewards/chosen" = beta * (pc - rc),
        "rewards/rejected", "rewards/margins", "rewards/accuracies" (1.0 where the chosen
        reward is larger), "logps/chosen", "logps/rejected".
    """
    pc, pr = as_float(chosen_logps), as_float(rejected_logps)
    chosen_ratio = pc - as_float(ref_chosen_logps).detach()
    rejected_ratio = pr - as_float(ref_rejected_logps).detach()
    loss = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))

    chosen_rewards = beta * chosen_ratio.detach()
    rejected_rewards = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).to(loss.dtype),
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }
    return loss, metrics


def _dpo(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    lp, ref = x.logps, x.ref_logps
    return dpo_loss(lp[0::2], lp[1::2], ref[0::2], ref[1::2], beta=cfg.beta)


register_algorithm(Algorithm("dpo", _dpo, pairs=True, build=chosen_and_rejected, fused_head=True))
