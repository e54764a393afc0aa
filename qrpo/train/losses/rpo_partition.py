"""Reward partitioning (Faye, Azzag, Lebbah; github b-faye/rpo): regress the policy's mean
per-token log-ratio onto rewards centred by a reference-model partition value.

Named `rpo_partition` because "RPO" also names unrelated methods.
"""

import math

import torch
from torch import Tensor

from qrpo.train.losses.common import as_float, token_counts, zscore_rewards
from qrpo.train.losses.spec import Algorithm, LossInputs, register_algorithm


def rpo_partition_values(
    ref_mean_token_logps: Tensor,
    rewards: Tensor,
    group_index: Tensor,
    num_groups: int,
    *,
    tau: float,
) -> Tensor:
    """Per-prompt partition value, computed once before training (docs/methods.md section 3):

        V_hat(x) = tau * log sum_i pbar_ref(y_i|x) * exp(r_i / tau),
        pbar_ref(y|x) = exp(mean per-token log pi_ref(y|x))

    evaluated as tau * logsumexp_i(mean_token_logp_i + r_i / tau) per group, so tiny tau
    (r / tau ~ 1e4 and more) does not overflow: V_hat -> max_i r_i as tau -> 0.

    Args:
        ref_mean_token_logps: [N] mean per-token reference log-prob of each response.
        rewards: [N] (z-scored) reward of each response.
        group_index: [N] int64 prompt id in [0, num_groups) of each response.
        num_groups: number of prompts.
        tau: temperature (5 in the reference code).

    Returns:
        [num_groups] V_hat per prompt (float32, or float64 for float64 inputs); -inf for a prompt
        with no responses.
    """
    a = as_float(ref_mean_token_logps).detach() + as_float(rewards).detach() / tau
    index = group_index.to(device=a.device, dtype=torch.long)
    group_max = a.new_full((num_groups,), -math.inf)
    group_max = group_max.scatter_reduce(0, index, a, reduce="amax", include_self=True)
    sum_exp = a.new_zeros(num_groups).index_add(0, index, torch.exp(a - group_max[index]))
    return tau * (group_max + torch.log(sum_exp))


def rpo_partition_loss(
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    num_tokens: Tensor,
    values: Tensor,
    *,
    tau: float,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Reward-partition loss (docs/methods.md section 3):

        mean_token_ratio = (log pi(y|x) - log pi_ref(y|x)) / |y|
        loss = 0.5 * (mean_token_ratio - (r - V_hat(x)) / tau)**2

    i.e. the policy's per-token probability pbar(y|x) regresses onto the partitioned target
    pbar_ref(y|x) * exp(r / tau) / exp(V_hat(x) / tau), normalised over the prompt's responses.
    V_hat is a constant from `rpo_partition_values` (detached); token counts are clamped >= 1.

    Args:
        logps, ref_logps: [B] summed policy / reference log-probs.
        rewards: [B] rewards, z-scored over the train set by the trainer (see `zscore`).
        num_tokens: [B] completion lengths |y|.
        values: [B] V_hat(x) of each sample's prompt.
        tau: temperature (5 in the reference code).

    Returns:
        loss [B] and per-example metrics: "rpo_partition/target" ((r - V_hat) / tau),
        "rpo_partition/mean_token_log_ratio", "rpo_partition/residual" (ratio - target),
        "rpo_partition/value", "logps/policy", "logps/ref".
    """
    policy = as_float(logps)
    ref = as_float(ref_logps).detach()
    mean_token_ratio = (policy - ref) / token_counts(num_tokens, policy)
    v = as_float(values).detach()
    target = (as_float(rewards).detach() - v) / tau
    residual = mean_token_ratio - target
    loss = 0.5 * residual**2

    metrics = {
        "rpo_partition/target": target,
        "rpo_partition/mean_token_log_ratio": mean_token_ratio.detach(),
        "rpo_partition/residual": residual.detach(),
        "rpo_partition/value": v,
        "logps/policy": policy.detach(),
        "logps/ref": ref,
    }
    return loss, metrics


def _rpo_partition(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    b = x.batch
    return rpo_partition_loss(x.logps, x.ref_logps, b.rewards, b.num_tokens, x.values, tau=cfg.tau)


def _partition_values(ref_logps: Tensor, sequences: list, num_prompts: int, cfg) -> Tensor:
    """V_hat(x) of every prompt, from the reference log-probs of all training sequences."""
    lengths = torch.tensor([max(s.num_completion_tokens, 1) for s in sequences])
    return rpo_partition_values(
        (ref_logps.cpu() / lengths).double(),
        torch.tensor([s.reward for s in sequences], dtype=torch.float64),
        torch.tensor([s.prompt_index for s in sequences]),
        num_prompts,
        tau=cfg.tau,
    ).float()


register_algorithm(
    Algorithm(
        "rpo_partition",
        _rpo_partition,
        needs_rewards=True,
        prepare=zscore_rewards,
        prompt_values=_partition_values,
    )
)
