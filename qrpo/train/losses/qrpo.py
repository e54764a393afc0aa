"""QRPO: Quantile Reward Policy Optimization (Matrenok, Moalla, Gulcehre 2025, arXiv 2507.08068).

`qrpo_trainer_loss` is the trainer's face of the public kernel `kernels.qrpo_loss`: it picks the
per-sample beta, keeps the reference side constant and renames the kernel's statistics into logged
metrics.
"""

from collections.abc import Mapping

import torch
from torch import Tensor

from qrpo.train.losses.common import as_float, token_counts
from qrpo.train.losses.spec import Algorithm, LossInputs, register_algorithm

# Metric name -> the names the kernel's stats may use for it (attributes or mapping keys).
_STATS = {
    "q": ("q",),
    "f_q": ("f_q", "fq"),
    "beta_logz": ("beta_logz",),
    "target": ("target", "target_log_ratio"),
    "residual": ("residual",),
    "log_ratio": ("log_ratio",),
}


def qrpo_trainer_loss(
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    ref_rewards: Tensor,
    *,
    beta: float,
    num_tokens: Tensor | None = None,
    length_normalized: bool = False,
    max_beta: float = 0.1,
    transform: str = "identity",
    ref_mask: Tensor | None = None,
    sigma: Tensor | None = None,
    estimator: str = "inclusive",
    exclude_index: Tensor | None = None,
    loss_type: str = "squared",
    generator: torch.Generator | None = None,
    backend: str = "auto",
    partition: str = "closed_form",
) -> tuple[Tensor, dict[str, Tensor]]:
    """QRPO loss per completion (docs/methods.md section 1):

        q        = (1/K) * #{k : ref_reward_k <= reward}           (quantile reward, inclusive)
        residual = f(q) - beta * log Z_f(beta) - beta * (log pi(y|x) - log pi_ref(y|x))
        loss     = residual**2                       (|residual| with loss_type="absolute")

    with Z_f(beta) = E_{q ~ U(0,1)}[exp(f(q) / beta)], exact under pi_ref as K -> infinity; for
    f = identity, beta * log Z = beta * (log(beta) + 1/beta + log1p(-exp(-1/beta))). With
    partition="finite_k" or "empirical", Z is the expectation of exp(f(q_hat)/beta) for the
    quantile as estimated from the row's K reference rewards (docs/partition.md). Gradient (identity,
    squared): d loss / d log pi = -2 * beta * residual.

    Pointwise: every row is one (prompt, completion, reward) sample. The reference code's
    chosen/rejected rows are passed as 2B samples (chosen then rejected, each with its prompt's
    reference rewards); the trainer's mean over the 2B losses equals the mean over rows of the
    pair mean.

    Length-normalised beta (swiss-ai/posttraining): with `length_normalized=True`, each sample
    uses beta_eff = min(beta / |y|, max_beta), and log Z is evaluated at beta_eff.

    Only `logps` receives gradient: reference log-probs and rewards are detached.

    Args:
        logps, ref_logps: [B] summed completion log-probs under the policy / reference.
        rewards: [B] reward of each completion.
        ref_rewards: [B, K] rewards of the prompt's K reference completions.
        beta: KL coefficient (paper: {3e-4, 1e-3, 3e-3} chat, {3e-3, 1e-2, 3e-2} code).
        num_tokens: [B] completion lengths; needed with `length_normalized`.
        length_normalized: use beta_eff = min(beta / num_tokens, max_beta) per sample.
        max_beta: upper clamp of the length-normalised beta.
        transform, ref_mask, sigma, estimator, exclude_index, loss_type, generator, backend,
        partition: passed to `kernels.qrpo_loss` (see its docstring).

    Returns:
        loss [B] float32 and per-example metrics: "qrpo/q", "qrpo/f_q", "qrpo/beta_logz",
        "qrpo/target" (target log-ratio), "qrpo/residual", "qrpo/log_ratio" (policy minus
        reference), "qrpo/beta" (effective beta), "logps/policy", "logps/ref".
    """
    from qrpo.kernels import qrpo_loss as fused_qrpo_loss  # lazy: kernels pulls in Triton

    policy = as_float(logps)
    ref = as_float(ref_logps).detach()
    if length_normalized:
        if num_tokens is None:
            raise ValueError("length_normalized=True needs num_tokens")
        beta_arg = (beta / token_counts(num_tokens, policy)).clamp(max=max_beta)
        beta_per_sample = beta_arg
    else:
        beta_arg = beta
        beta_per_sample = torch.full_like(policy.detach(), beta)

    loss, stats = fused_qrpo_loss(
        policy,
        ref,
        as_float(rewards).detach(),
        as_float(ref_rewards).detach(),
        beta_arg,
        transform=transform,
        ref_mask=ref_mask,
        sigma=sigma,
        estimator=estimator,
        exclude_index=exclude_index,
        loss_type=loss_type,
        generator=generator,
        return_stats=True,
        backend=backend,
        partition=partition,
    )
    metrics = {f"qrpo/{name}": _stat(stats, keys).detach() for name, keys in _STATS.items()}
    metrics["qrpo/beta"] = beta_per_sample
    metrics["logps/policy"] = policy.detach()
    metrics["logps/ref"] = ref
    return loss, metrics


def _stat(stats: object, names: tuple[str, ...]) -> Tensor:
    """One statistic of the kernel, whether `stats` is a mapping or an object with attributes."""
    for name in names:
        value = stats.get(name) if isinstance(stats, Mapping) else getattr(stats, name, None)
        if value is not None:
            return value
    raise KeyError(f"kernels.qrpo_loss returned no statistic named any of {names}")


def _qrpo(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    b = x.batch
    return qrpo_trainer_loss(
        x.logps,
        x.ref_logps,
        b.rewards,
        b.ref_rewards,
        beta=cfg.beta,
        num_tokens=b.num_tokens,
        length_normalized=cfg.length_normalized,
        max_beta=cfg.max_beta,
        transform=cfg.transform,
        ref_mask=b.ref_mask,
        sigma=b.sigma if cfg.transform == "scaled_normal_icdf" else None,
        estimator=cfg.estimator,
        exclude_index=b.ref_index,
        loss_type=cfg.loss_type,
        generator=x.generator,
        backend=cfg.kernel_backend,
        partition=cfg.partition,
    )


def min_reference_rewards(cfg) -> int:
    """A quantile needs one reference reward; the normal-quantile transforms' sigma needs three."""
    return 3 if cfg.transform in ("normal_icdf", "scaled_normal_icdf") else 1


def reference_sigmas(sequences: list, cfg) -> None:
    """scaled_normal_icdf: sigma = the prompt's reference-reward std (ddof 1) / its mean over the
    train set."""
    if cfg.transform != "scaled_normal_icdf":
        return
    stds = [torch.tensor(s.ref_rewards, dtype=torch.float64).std().item() for s in sequences]
    mean = sum(stds) / len(stds)
    for s, std in zip(sequences, stds):
        # A prompt whose reference rewards all tie gets f(q) ~ 0: a target of "stay at the
        # reference". The floor keeps sigma inside the kernel's domain (sigma > 0).
        s.sigma = max(std / mean, 1e-6) if mean > 0 else 1.0


register_algorithm(
    Algorithm(
        "qrpo",
        _qrpo,
        needs_rewards=True,
        prepare=reference_sigmas,
        min_ref_rewards=min_reference_rewards,
        fused_head=True,
    )
)
