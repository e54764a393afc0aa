"""REBEL: REgression to RElative REward Based RL (Gao et al. 2024, arXiv 2404.16767)."""

from torch import Tensor

from qrpo.train.losses.common import as_float
from qrpo.train.losses.spec import Algorithm, LossInputs, chosen_and_rejected, register_algorithm


def rebel_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    *,
    beta: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """REBEL loss, paper eq. 1 (docs/methods.md section 3), with pi_t = pi_ref and eta = 1/beta:

        h    = (log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))
        loss = ((r_w - r_l) / beta - h)**2

    on raw rewards. The loss scale grows like 1/beta**2 (beta down to 1e-6 in the paper grid);
    that is the method's definition, kept as is. References and rewards are constants.

    Args:
        chosen_logps, rejected_logps: [B] summed policy log-probs.
        ref_chosen_logps, ref_rejected_logps: [B] summed reference log-probs.
        chosen_rewards, rejected_rewards: [B] rewards r_w, r_l.
        beta: regression scale.

    Returns:
        loss [B] and per-example metrics: "rewards/chosen" = beta * (pc - rc),
        "rewards/rejected", "rewards/margins", "rewards/accuracies", "rebel/target"
        = (r_w - r_l) / beta, "rebel/residual" = target - h, "logps/chosen", "logps/rejected".
    """
    pc, pr = as_float(chosen_logps), as_float(rejected_logps)
    chosen_ratio = pc - as_float(ref_chosen_logps).detach()
    rejected_ratio = pr - as_float(ref_rejected_logps).detach()
    target = (as_float(chosen_rewards) - as_float(rejected_rewards)).detach() / beta
    residual = target - (chosen_ratio - rejected_ratio)
    loss = residual**2

    implicit_chosen = beta * chosen_ratio.detach()
    implicit_rejected = beta * rejected_ratio.detach()
    metrics = {
        "rewards/chosen": implicit_chosen,
        "rewards/rejected": implicit_rejected,
        "rewards/margins": implicit_chosen - implicit_rejected,
        "rewards/accuracies": (implicit_chosen > implicit_rejected).to(loss.dtype),
        "rebel/target": target,
        "rebel/residual": residual.detach(),
        "logps/chosen": pc.detach(),
        "logps/rejected": pr.detach(),
    }
    return loss, metrics


def _rebel(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    lp, ref, r = x.logps, x.ref_logps, x.batch.rewards
    return rebel_loss(lp[0::2], lp[1::2], ref[0::2], ref[1::2], r[0::2], r[1::2], beta=cfg.beta)


register_algorithm(
    Algorithm(
        "rebel",
        _rebel,
        pairs=True,
        needs_rewards=True,
        build=chosen_and_rejected,
        fused_head=True,
    )
)
