"""KTO: Kahneman-Tversky Optimization (Ethayarajh et al. 2024, arXiv 2402.01306)."""

import torch
from torch import Tensor

from qrpo.train.losses.common import as_float
from qrpo.train.losses.spec import Algorithm, LossInputs, register_algorithm


def kto_loss(
    logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    *,
    beta: float,
    kl_logps: Tensor | None = None,
    kl_ref_logps: Tensor | None = None,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """KTO loss, the paper's L_KTO = E[lambda_y - v(x, y)] (docs/methods.md section 3):

        ratio = log pi(y|x) - log pi_ref(y|x)
        z0    = max(0, mean_j (log pi(y_j|x_i) - log pi_ref(y_j|x_i)))      (detached)
        loss  = w_D * (1 - sigmoid(beta * (ratio - z0)))   if y is desirable
                w_U * (1 - sigmoid(beta * (z0 - ratio)))   if y is undesirable

    The reference point z0 estimates KL(pi || pi_ref) from mismatched (prompt_i, completion_j)
    pairs passed as `kl_logps` / `kl_ref_logps`; it is detached, so no gradient flows through it.
    Without them, z0 falls back to the mean of this batch's own (detached) ratios: an
    approximation, since matched completions are the training data rather than samples of the
    policy, and it is biased upward when the policy has learnt to like the desirable ones. z0 is
    a batch statistic: the trainer may all-reduce kl inputs first if it wants a global estimate.

    Args:
        logps, ref_logps: [B] summed policy / reference log-probs of the completions.
        desirable: [B] bool, True for desirable completions.
        beta: KL coefficient (0.1 in the paper).
        kl_logps, kl_ref_logps: [M] policy / reference log-probs of mismatched pairs, or None.
        desirable_weight, undesirable_weight: lambda_D and lambda_U.

    Returns:
        loss [B] and metrics: "kto/kl" (z0, scalar), "kto/rewards" (beta * ratio, per example),
        "rewards/chosen" / "rewards/rejected" (mean implicit reward over desirable /
        undesirable examples, 0 when there are none), their sums "rewards/chosen_sum" /
        "rewards/rejected_sum" and counts "count/chosen" / "count/rejected" (so the trainer can
        average exactly across micro-batches), "logps/policy", "logps/ref".
    """
    policy = as_float(logps)
    ref = as_float(ref_logps).detach()
    ratio = policy - ref
    if (kl_logps is None) != (kl_ref_logps is None):
        raise ValueError("pass both kl_logps and kl_ref_logps, or neither")
    if kl_logps is not None:
        kl = (as_float(kl_logps) - as_float(kl_ref_logps)).detach().mean()
    else:
        kl = ratio.detach().mean()
    z0 = kl.clamp(min=0.0)

    desirable = desirable.to(device=ratio.device, dtype=torch.bool)
    chosen_loss = desirable_weight * (1.0 - torch.sigmoid(beta * (ratio - z0)))
    rejected_loss = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - ratio)))
    loss = torch.where(desirable, chosen_loss, rejected_loss)

    rewards = beta * ratio.detach()
    num_chosen = desirable.sum().to(rewards.dtype)
    num_rejected = (~desirable).sum().to(rewards.dtype)
    chosen_sum = torch.where(desirable, rewards, 0.0).sum()
    rejected_sum = torch.where(desirable, 0.0, rewards).sum()
    metrics = {
        "kto/kl": z0,
        "kto/rewards": rewards,
        "rewards/chosen": chosen_sum / num_chosen.clamp(min=1.0),
        "rewards/rejected": rejected_sum / num_rejected.clamp(min=1.0),
        "rewards/chosen_sum": chosen_sum,
        "rewards/rejected_sum": rejected_sum,
        "count/chosen": num_chosen,
        "count/rejected": num_rejected,
        "logps/policy": policy.detach(),
        "logps/ref": ref,
    }
    return loss, metrics


def _kto(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    kl_logps, kl_ref_logps = x.kl_logps if x.kl_logps is not None else (None, None)
    return kto_loss(
        x.logps,
        x.ref_logps,
        x.batch.desirable,
        beta=cfg.beta,
        kl_logps=kl_logps,
        kl_ref_logps=kl_ref_logps,
        desirable_weight=cfg.kto_desirable_weight,
        undesirable_weight=cfg.kto_undesirable_weight,
    )


def labelled_completions(row: dict, seq, cfg) -> list[list]:
    """Every completion is an example, desirable when it is the row's chosen one (pair rows) or
    when its reward is at least loss.kto_threshold (grouped rows)."""
    examples = []
    for j, c in enumerate(row["completions"]):
        if row["chosen"] >= 0:
            good = j == row["chosen"]
        else:
            good = c["reward"] is not None and c["reward"] >= cfg.kto_threshold
        examples.append([seq(c, desirable=good)])
    return examples


register_algorithm(Algorithm("kto", _kto, build=labelled_completions, mismatched_kl=True))
