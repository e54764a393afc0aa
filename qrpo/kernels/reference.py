"""The naive reference of per-sequence log-probs: full [N, V] logits through plain autograd.

    logp[s] = sum_{t in s, target_t != -100} log_softmax(z_t)[target_t]
    z_t     = softcap * tanh(((h_t W^T + b) / temperature) / softcap)     (softcap optional)

The tests run it on float64 inputs as the reference of the torch and Triton backends; it is also
the "naive" backend of `sequence_logprobs` and the baseline of `python -m qrpo.kernels.bench`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels.segments import accumulation_dtype, segment_sum, sequence_ids


def naive_sequence_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> Tensor:
    """Reference implementation: [N, V] logits through autograd (N*V*4 bytes, plus as much again
    for the softmax saved for backward). Logits are produced in the input dtype, exactly like a
    plain `lm_head` call, then upcast: for bf16 inputs this is the bf16-rounded-logits baseline."""
    z = F.linear(hidden, weight, bias).to(accumulation_dtype(hidden.dtype))
    if temperature != 1.0:
        z = z / temperature
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    logp = torch.log_softmax(z, dim=-1)
    valid = targets != IGNORE_INDEX
    picked = logp.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
    picked = torch.where(valid, picked, torch.zeros_like(picked))
    seq_id = sequence_ids(cu_seqlens, hidden.shape[0])
    return segment_sum(picked, seq_id, cu_seqlens.numel() - 1)
