"""DRO: Direct Reward Optimization with a learned value (Richemond et al. 2024,
arXiv 2405.19107), the DRO-V variant."""

from torch import Tensor

from qrpo.train.losses.common import as_float, zscore_rewards
from qrpo.train.losses.spec import Algorithm, LossInputs, register_algorithm


def dro_loss(
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    values: Tensor,
    *,
    tau: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """DRO loss: the single-trajectory regression (docs/methods.md section 3)

        L(pi, V) = 0.5 * (r - V(x) - tau * ratio)**2,   ratio = log pi(y|x) - log pi_ref(y|x)

    optimised as two decoupled parts, as in DRO-V:

        policy surrogate: -log pi(y|x) * sg(r - V(x)) + (tau / 2) * ratio**2
        value loss:        0.5 * (r - V(x) - tau * sg(ratio))**2

    so the policy gradient is -(r - V - tau * ratio) * d log pi and the value gradient is
    -(r - V - tau * ratio) * dV. The returned per-example loss is their sum; its value is not
    L(pi, V) (the surrogate's value has no meaning), so log "dro/residual" instead.

    Args:
        logps, ref_logps: [B] summed policy / reference log-probs.
        rewards: [B] rewards, z-scored by the trainer (see `zscore`).
        values: [B] learned V(x) of each sample's prompt, with grad (gathered by the trainer
            from its value table).
        tau: KL coefficient (1 in the paper).

    Returns:
        loss [B] and per-example metrics: "dro/value" (V), "dro/residual" (r - V - tau*ratio),
        "dro/policy_loss", "dro/value_loss", "dro/log_ratio", "logps/policy", "logps/ref".
    """
    policy = as_float(logps)
    ref = as_float(ref_logps).detach()
    ratio = policy - ref
    r = as_float(rewards).detach()
    v = as_float(values)

    policy_loss = -policy * (r - v.detach()) + 0.5 * tau * ratio**2
    value_loss = 0.5 * (r - v - tau * ratio.detach()) ** 2
    loss = policy_loss + value_loss

    metrics = {
        "dro/value": v.detach(),
        "dro/residual": (r - v - tau * ratio).detach(),
        "dro/policy_loss": policy_loss.detach(),
        "dro/value_loss": value_loss.detach(),
        "dro/log_ratio": ratio.detach(),
        "logps/policy": policy.detach(),
        "logps/ref": ref,
    }
    return loss, metrics


def _dro(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    return dro_loss(x.logps, x.ref_logps, x.batch.rewards, x.values, tau=cfg.tau)


register_algorithm(
    Algorithm(
        "dro",
        _dro,
        needs_rewards=True,
        prepare=zscore_rewards,
        learned_values=True,
    )
)
