"""Public entry points: argument checks, backend dispatch, and thin nn.Module faces.

Backends:
- "triton": fused Triton kernels (CUDA; on CPU only through TRITON_INTERPRET=1, for tests).
- "torch":  chunked PyTorch with bounded memory (CPU path and fallback).
- "naive":  full logits through plain autograd (the reference in tests; sequence_logprobs only).
- "auto":   triton when the tensors are on CUDA, torch otherwise.

Host synchronisation: shape, dtype and device checks are free. Checks of tensor *values* need a
device-to-host copy on CUDA, so they are grouped into one sync and gated:
- sequence_logprobs: targets in [0, V) or -100, and cu_seqlens (starts at 0, ends at N,
  non-decreasing) are checked when `check_targets=True`; cu_seqlens values are also always
  checked when the tensor is on CPU, where reading them costs nothing. Pass check_targets=False
  in a CUDA training loop for a sync-free call.
- qrpo_loss: NaN rewards, rows without valid reference rewards (or fewer than 3 for the normal
  icdf transforms), beta <= 0 and out-of-range exclude_index are checked on CPU only; on CUDA they
  propagate as NaN/inf.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from common.constants import IGNORE_INDEX
from kernels.partition import EMPIRICAL_ESTIMATORS, PARTITIONS, row_log_partition
from kernels.qrpo import (
    ESTIMATORS,
    LOSS_TYPES,
    TRANSFORMS,
    QRPOStats,
    draw_uniform,
    qrpo_loss_torch,
    reference_validity,
)
from kernels.reference import (
    PackedTargets,
    chunked_sequence_logprobs,
    naive_sequence_logprobs,
    sequence_ids,
)

LOGPROB_BACKENDS = ("auto", "triton", "torch", "naive")
LOSS_BACKENDS = ("auto", "triton", "torch")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _resolve(backend: str, device: torch.device, allowed: tuple[str, ...]) -> str:
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def _raise_if(failures: list[tuple[Tensor, str]]) -> None:
    """Evaluate several boolean-tensor checks with one host transfer; raise the first failure."""
    if not failures:
        return
    flags = torch.stack([f.reshape(()) for f, _ in failures]).tolist()
    for bad, (_, message) in zip(flags, failures):
        if bad:
            raise ValueError(message)


# ---------------------------------------------------------------------------------------------
# sequence_logprobs
# ---------------------------------------------------------------------------------------------


def _check_logprob_args(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    bias: Tensor | None,
    temperature: float,
    softcap: float | None,
    backend: str,
    check_targets: bool,
) -> None:
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, D], got shape {tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(
            f"weight must be [V, D] with D = {hidden.shape[1]}, got shape {tuple(weight.shape)}"
        )
    if hidden.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"hidden must be a float tensor, got {hidden.dtype}")
    if backend == "triton" and hidden.dtype == torch.float64:
        raise ValueError("hidden: float64 is supported by the torch and naive backends only")
    if weight.dtype != hidden.dtype:
        raise ValueError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    if targets.dim() != 1 or targets.shape[0] != hidden.shape[0]:
        raise ValueError(f"targets must be [N] = [{hidden.shape[0]}], got {tuple(targets.shape)}")
    if targets.dtype != torch.int64:
        raise ValueError(f"targets must be int64, got {targets.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(f"cu_seqlens must be [S + 1], got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must be [V] = [{weight.shape[0]}], got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise ValueError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    named = {"weight": weight, "targets": targets, "cu_seqlens": cu_seqlens, "bias": bias}
    for name, t in named.items():
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap}")

    failures: list[tuple[Tensor, str]] = []
    n = hidden.shape[0]
    if check_targets or cu_seqlens.device.type == "cpu":
        failures += [
            (cu_seqlens[0] != 0, "cu_seqlens must start at 0"),
            (cu_seqlens[-1] != n, f"cu_seqlens must end at N = {n}"),
        ]
        if cu_seqlens.numel() > 1:
            decreasing = (cu_seqlens[1:] < cu_seqlens[:-1]).any()
            failures.append((decreasing, "cu_seqlens must be non-decreasing"))
    if check_targets and n > 0:
        bad = ((targets < 0) | (targets >= weight.shape[0])) & (targets != IGNORE_INDEX)
        failures.append((bad.any(), f"targets must be in [0, {weight.shape[0]}) or {IGNORE_INDEX}"))
    _raise_if(failures)


def sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    check_targets: bool = True,
) -> Tensor:
    """Summed log-probability of each packed sequence's targets, without storing [N, V] logits.

    result[s] = sum over t in [cu_seqlens[s], cu_seqlens[s+1]) with targets[t] != -100 of
    log_softmax(z_t)[targets[t]], z_t = (hidden[t] @ weight.T + bias) / temperature, then
    z_t = softcap * tanh(z_t / softcap) when softcap is set. Max, log-sum-exp and target logit
    come from fp32 accumulators (rounding logits to bf16 would move a 1000-token log-prob by up
    to ~0.9 nats); the weight gradient is accumulated in fp32.

    Args:
        hidden: [N, D] final hidden states (bf16, fp16, fp32; float64 on torch/naive backends).
        weight: [V, D] LM head, same dtype; may be tied to the input embedding (its gradient is
            returned like any other and autograd sums both uses).
        targets: [N] int64, already shifted (targets[t] is predicted from hidden[t]); -100 = skip.
        cu_seqlens: [S + 1] int32/int64 sequence boundaries (flash-attn varlen convention).
            Empty sequences are allowed and give 0 with zero gradient.
        bias: optional [V] bias of the head.
        temperature: > 0, divides the logits.
        softcap: optional > 0 tanh soft cap applied after the temperature.
        backend: "auto" | "triton" | "torch" | "naive" (see module docstring).
        check_targets: run the value checks that need a device sync (see module docstring).
            Unchecked bad values are not caught later: a target outside [0, V) matches no
            column on the torch/triton backends (that token contributes -lse), and a cu_seqlens
            that does not end at N indexes out of bounds.

    Returns:
        [S] float32 (float64 for float64 inputs), differentiable w.r.t. hidden, weight and bias.
    """
    resolved = _resolve(backend, hidden.device, LOGPROB_BACKENDS)
    _check_logprob_args(
        hidden, weight, targets, cu_seqlens, bias, temperature, softcap, resolved, check_targets
    )
    temperature, softcap = float(temperature), None if softcap is None else float(softcap)
    if resolved == "naive":
        return naive_sequence_logprobs(
            hidden, weight, targets, cu_seqlens, bias, temperature, softcap
        )
    packed = PackedTargets(
        targets=targets,
        seq_id=sequence_ids(cu_seqlens, hidden.shape[0]),
        num_seqs=cu_seqlens.numel() - 1,
        temperature=temperature,
        softcap=softcap,
    )
    if resolved == "torch":
        return chunked_sequence_logprobs(hidden, weight, bias, packed)
    from kernels.logprobs_triton import triton_sequence_logprobs  # triton imported lazily

    return triton_sequence_logprobs(hidden, weight, bias, packed)


class SequenceLogprobs(nn.Module):
    """Module face of `sequence_logprobs` holding its options; the head is passed per call so that
    a tied or FSDP-sharded weight is used as the model owns it."""

    def __init__(
        self,
        temperature: float = 1.0,
        softcap: float | None = None,
        backend: str = "auto",
        check_targets: bool = True,
    ) -> None:
        super().__init__()
        if backend not in LOGPROB_BACKENDS:
            raise ValueError(f"backend must be one of {LOGPROB_BACKENDS}, got {backend!r}")
        self.temperature, self.softcap = temperature, softcap
        self.backend, self.check_targets = backend, check_targets

    def forward(
        self,
        hidden: Tensor,
        weight: Tensor,
        targets: Tensor,
        cu_seqlens: Tensor,
        bias: Tensor | None = None,
    ) -> Tensor:
        return sequence_logprobs(
            hidden,
            weight,
            targets,
            cu_seqlens,
            bias=bias,
            temperature=self.temperature,
            softcap=self.softcap,
            backend=self.backend,
            check_targets=self.check_targets,
        )


# ---------------------------------------------------------------------------------------------
# qrpo_loss
# ---------------------------------------------------------------------------------------------


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
    _raise_if(failures)


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
    resolved = _resolve(backend, logps.device, LOSS_BACKENDS)
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

    from kernels.qrpo_triton import QRPOBatch, TritonQRPOLoss  # triton imported lazily

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
