"""Public entry point of the QRPO loss: argument checks, backend dispatch, module face.

Backends: "triton" (the fused kernel, qrpo/kernels/qrpo_triton.py), "torch" (qrpo/kernels/qrpo.py, also the
reference of the kernel) and "auto" (triton on CUDA, torch otherwise).

Host synchronisation: NaN rewards, rows without valid reference rewards (or fewer than 3 for the
normal icdf transforms), beta <= 0 and out-of-range exclude_index are checked on CPU only; on
CUDA they propagate as NaN/inf (checking them would stall the stream).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrpo.kernels.checks import raise_first_failure, resolve_backend
from qrpo.kernels.partition import EMPIRICAL_ESTIMATORS, PARTITIONS, row_log_partition
from qrpo.kernels.qrpo import (
    ESTIMATORS,
    LOSS_TYPES,
    TRANSFORMS,
    QRPOStats,
    draw_uniform,
    qrpo_loss_torch,
    reference_validity,
)

LOSS_BACKENDS = ("auto", "triton", "torch")


def _as_rows(x: float | Tensor, name: str, b: int, device: torch.device) -> Tensor:
    """A float or [B] tensor as a float64 [B] tensor on `device`."""
    if isinstance(x, Tensor):
        if x.dim() == 0:
            x = x.expand(b)
        if x.shape != (b,):
            raise ValueError(f"{name} must be a float or a [B] = [{b}] tensor, got {x.shape}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but logps is on {device}")
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {x.dtype}")
        return x.detach().to(torch.float64)
    if not x > 0:
        raise ValueError(f"{name} must be > 0, got {x}")
    return torch.full((b,), float(x), dtype=torch.float64, device=device)


def _check_loss_args(
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    ref_rewards: Tensor,
    transform: str,
    ref_mask: Tensor | None,
    sigma: float | Tensor | None,
    estimator: str,
    exclude_index: Tensor | None,
    loss_type: str,
    generator: torch.Generator | None,
    partition: str,
) -> None:
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    if partition == "empirical" and estimator not in EMPIRICAL_ESTIMATORS:
        raise ValueError(
            f"partition='empirical' needs estimator in {EMPIRICAL_ESTIMATORS}, got {estimator!r}"
        )
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if logps.dim() != 1:
        raise ValueError(f"logps must be [B], got shape {tuple(logps.shape)}")
    b = logps.shape[0]
    for name, t in (("ref_logps", ref_logps), ("rewards", rewards)):
        if t.shape != (b,):
            raise ValueError(f"{name} must be [B] = [{b}], got shape {tuple(t.shape)}")
    if ref_rewards.dim() != 2 or ref_rewards.shape[0] != b or ref_rewards.shape[1] < 1:
        raise ValueError(f"ref_rewards must be [B = {b}, K >= 1], got {tuple(ref_rewards.shape)}")
    for name, t in (
        ("logps", logps),
        ("ref_logps", ref_logps),
        ("rewards", rewards),
        ("ref_rewards", ref_rewards),
    ):
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {t.dtype}")
    if ref_mask is not None and (
        ref_mask.shape != ref_rewards.shape or ref_mask.dtype != torch.bool
    ):
        shape = tuple(ref_rewards.shape)
        raise ValueError(f"ref_mask must be a bool tensor shaped like ref_rewards {shape}")
    if exclude_index is not None and (
        exclude_index.shape != (b,) or exclude_index.is_floating_point()
    ):
        raise ValueError(f"exclude_index must be an integer [B] = [{b}] tensor")
    if transform in ("normal_icdf", "scaled_normal_icdf") and ref_rewards.shape[1] < 3:
        raise ValueError(f"ref_rewards: transform={transform!r} needs K >= 3 reference rewards")
    if transform == "scaled_normal_icdf" and sigma is None:
        raise ValueError("sigma is required for transform='scaled_normal_icdf'")
    named = {
        "ref_logps": ref_logps,
        "rewards": rewards,
        "ref_rewards": ref_rewards,
        "ref_mask": ref_mask,
        "exclude_index": exclude_index,
    }
    for name, t in named.items():
        if t is not None and t.device != logps.device:
            raise ValueError(f"{name} is on {t.device} but logps is on {logps.device}")
    if generator is not None and generator.device.type != logps.device.type:
        raise ValueError(f"generator is on {generator.device} but logps is on {logps.device}")


def _check_loss_values(
    rewards: Tensor,
    ref_rewards: Tensor,
    valid: Tensor,
    beta: Tensor,
    sigma: Tensor | None,
    exclude_index: Tensor | None,
    transform: str,
) -> None:
    """Value checks, run on CPU only (on CUDA they would stall the stream)."""
    k = ref_rewards.shape[1]
    min_k = 3 if transform in ("normal_icdf", "scaled_normal_icdf") else 1
    failures = [
        (torch.isnan(rewards).any(), "rewards contain NaN"),
        ((torch.isnan(ref_rewards) & valid).any(), "ref_rewards contain NaN at valid entries"),
        (
            (valid.sum(1) < min_k).any(),
            f"ref_mask/exclude_index leave a row with < {min_k} valid reference rewards",
        ),
        ((beta <= 0).any() | beta.isnan().any(), "beta must be > 0"),
    ]
    if sigma is not None:
        failures.append(((sigma <= 0).any() | sigma.isnan().any(), "sigma must be > 0"))
    if exclude_index is not None:
        out = ((exclude_index < -1) | (exclude_index >= k)).any()
        failures.append((out, f"exclude_index must be in [-1, {k})"))
    raise_first_failure(failures)


def qrpo_loss(
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    ref_rewards: Tensor,
    beta: float | Tensor,
    *,
    transform: str = "identity",
    ref_mask: Tensor | None = None,
    sigma: float | Tensor | None = None,
    estimator: str = "inclusive",
    exclude_index: Tensor | None = None,
    loss_type: str = "squared",
    generator: torch.Generator | None = None,
    return_stats: bool = False,
    backend: str = "auto",
    partition: str = "closed_form",
) -> Tensor | tuple[Tensor, QRPOStats]:
    """Per-sample QRPO loss (Matrenok et al. 2025, "Quantile Reward Policy Optimization",
    arXiv 2507.08068): a pointwise regression of the policy log-ratio onto the quantile reward.

        residual = f(q) - beta * log Z_f(beta) - beta * (logps - ref_logps)
        loss     = residual**2  ("squared")  or  |residual|  ("absolute")

    with q the quantile of `rewards` among the row's reference rewards. Only `logps` receives a
    gradient; ref_logps, rewards and beta are constants of the regression.

    Args:
        logps, ref_logps: [B] summed completion log-probs of the policy and the reference.
        rewards: [B] reward of each completion.
        ref_rewards: [B, K] rewards of the prompt's reference completions.
        beta: float or [B] tensor (e.g. length-normalised beta per sample).
        transform: f in "identity" (paper runs), "log", "normal_icdf", "scaled_normal_icdf"
            (needs sigma), "square", "sqrt"; each with its exact partition function.
        ref_mask: [B, K] bool, True = valid, for rows with fewer than K reference rewards.
        sigma: float or [B] scale for "scaled_normal_icdf".
        estimator: "inclusive" #(ref <= r)/K; "midrank" (#less + #equal/2)/K; "randomized"
            (#less + U #equal)/K with U ~ U(0, 1) per sample, uniform under ties.
        exclude_index: [B] int, column of the completion itself in ref_rewards (-1 for none);
            it is left out of that row's reference set, so K_valid drops by one.
        loss_type: "squared" or "absolute".
        generator: torch.Generator on logps' device for the randomized estimator; None uses
            torch's default generator (then runs are reproducible only through torch.manual_seed).
        return_stats: also return a QRPOStats of detached per-sample diagnostics.
        backend: "auto" (triton on CUDA, torch otherwise), "triton" or "torch".
        partition: the log Z of each row (docs/partition.md): "closed_form" (the paper's,
            q ~ Uniform(0, 1)), "finite_k" (q uniform on the grid j/K, K = the row's number of
            valid reference rewards) or "empirical" (from the row's own reference rewards, for
            ties; inclusive and midrank estimators only). Computed once in float64 torch and shared
            by both backends.

    Returns:
        loss [B] float32, or (loss, stats) when return_stats.
    """
    resolved = resolve_backend(backend, logps.device, LOSS_BACKENDS)
    _check_loss_args(
        logps,
        ref_logps,
        rewards,
        ref_rewards,
        transform,
        ref_mask,
        sigma,
        estimator,
        exclude_index,
        loss_type,
        generator,
        partition,
    )
    b = logps.shape[0]
    beta_rows = _as_rows(beta, "beta", b, logps.device)
    sigma_rows = None if sigma is None else _as_rows(sigma, "sigma", b, logps.device)
    ref_rewards = ref_rewards.detach()
    if logps.device.type == "cpu":
        valid = reference_validity(ref_rewards, ref_mask, exclude_index)
        _check_loss_values(
            rewards, ref_rewards, valid, beta_rows, sigma_rows, exclude_index, transform
        )
    uniform = draw_uniform(b, generator, logps.device) if estimator == "randomized" else None
    log_z = row_log_partition(
        partition,
        transform,
        beta_rows,
        sigma=sigma_rows,
        ref_rewards=ref_rewards,
        ref_mask=ref_mask,
        exclude_index=exclude_index,
        estimator=estimator,
    )
    beta_logz = beta_rows * log_z

    if resolved == "torch":
        loss, stats = qrpo_loss_torch(
            logps,
            ref_logps,
            rewards.detach(),
            ref_rewards,
            beta_rows,
            beta_logz,
            transform=transform,
            ref_mask=ref_mask,
            sigma=sigma_rows,
            estimator=estimator,
            exclude_index=exclude_index,
            loss_type=loss_type,
            uniform=uniform,
        )
        return (loss, stats) if return_stats else loss

    from qrpo.kernels.qrpo_triton import QRPOBatch, TritonQRPOLoss  # triton imported lazily

    batch = QRPOBatch(
        ref_logps=ref_logps.detach(),
        rewards=rewards.detach(),
        ref_rewards=ref_rewards,
        ref_mask=ref_mask,
        exclude_index=exclude_index,
        uniform=uniform,
        beta=beta_rows,
        beta_logz=beta_logz,
        sigma=sigma_rows,
        transform=transform,
        estimator=estimator,
        loss_type=loss_type,
    )
    loss, residual, q, fq = TritonQRPOLoss.apply(logps, batch)
    if not return_stats:
        return loss
    stats = QRPOStats(
        q=q,
        fq=fq,
        beta_logz=beta_logz.float(),
        target_log_ratio=((fq.double() - beta_logz) / beta_rows).float(),
        residual=residual,
        log_ratio=(logps.detach().double() - ref_logps.detach().double()).float(),
    )
    return loss, stats


class QRPOLoss(nn.Module):
    """Module face of `qrpo_loss` holding beta and the method options; returns per-sample losses
    (and stats) for the trainer to reduce and log."""

    def __init__(
        self,
        beta: float,
        transform: str = "identity",
        estimator: str = "inclusive",
        loss_type: str = "squared",
        backend: str = "auto",
        partition: str = "closed_form",
    ) -> None:
        super().__init__()
        for name, value, allowed in (
            ("transform", transform, TRANSFORMS),
            ("estimator", estimator, ESTIMATORS),
            ("loss_type", loss_type, LOSS_TYPES),
            ("backend", backend, LOSS_BACKENDS),
            ("partition", partition, PARTITIONS),
        ):
            if value not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {value!r}")
        if not beta > 0:
            raise ValueError(f"beta must be > 0, got {beta}")
        self.beta, self.transform, self.estimator = beta, transform, estimator
        self.loss_type, self.backend, self.partition = loss_type, backend, partition

    def forward(
        self,
        logps: Tensor,
        ref_logps: Tensor,
        rewards: Tensor,
        ref_rewards: Tensor,
        *,
        ref_mask: Tensor | None = None,
        sigma: float | Tensor | None = None,
        exclude_index: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Tensor, QRPOStats]:
        return qrpo_loss(
            logps,
            ref_logps,
            rewards,
            ref_rewards,
            self.beta,
            transform=self.transform,
            ref_mask=ref_mask,
            sigma=sigma,
            estimator=self.estimator,
            exclude_index=exclude_index,
            loss_type=self.loss_type,
            generator=generator,
            return_stats=True,
            backend=self.backend,
            partition=self.partition,
        )
