"""Public entry point of per-sequence log-probs: argument checks, backend dispatch, module face.

Backends:
- "triton": fused Triton kernels (qrpo/kernels/logprobs_triton.py; CUDA, or CPU through
  TRITON_INTERPRET=1 for tests).
- "torch":  chunked PyTorch with bounded memory (qrpo/kernels/logprobs_torch.py; CPU path, fallback).
- "naive":  full logits through plain autograd (qrpo/kernels/reference.py; the reference in tests).
- "auto":   triton when the tensors are on CUDA, torch otherwise.

Host synchronisation: shape, dtype and device checks are free. Checks of tensor *values* need a
device-to-host copy on CUDA, so they are grouped into one sync and gated: targets in [0, V) or
-100, and cu_seqlens (starts at 0, ends at N, non-decreasing) are checked when
`check_targets=True`; cu_seqlens values are also always checked when the tensor is on CPU, where
reading them costs nothing. Pass check_targets=False in a CUDA training loop for a sync-free call.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels.checks import raise_first_failure, resolve_backend
from qrpo.kernels.logprobs_torch import chunked_sequence_logprobs
from qrpo.kernels.reference import naive_sequence_logprobs
from qrpo.kernels.segments import PackedTargets, sequence_ids

LOGPROB_BACKENDS = ("auto", "triton", "torch", "naive")
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_logprob_args(
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
    raise_first_failure(failures)


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
    resolved = resolve_backend(backend, hidden.device, LOGPROB_BACKENDS)
    check_logprob_args(
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
    from qrpo.kernels.logprobs_triton import triton_sequence_logprobs  # triton imported lazily

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
