"""Small helpers shared by the loss modules."""

import torch
from torch import Tensor


def as_float(x: Tensor) -> Tensor:
    """Return `x` in float32, or unchanged if it is already float32 or float64.

    Losses compute in at least float32 (bf16/fp16/integer inputs are upcast); float64 inputs are
    kept so that tests can check values and gradients in double precision.
    """
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


def token_counts(num_tokens: Tensor, like: Tensor) -> Tensor:
    """Completion lengths as floats of `like`'s dtype, clamped to >= 1 (empty completions)."""
    return num_tokens.detach().to(device=like.device, dtype=like.dtype).clamp(min=1.0)


def zscore(rewards: Tensor) -> Tensor:
    """Standardise rewards: (r - mean(r)) / std(r), over all elements of `rewards`.

    Uses the population std (ddof 0), so the result has mean 0 and population variance 1; the
    trainer applies it once over the whole training set (docs/methods.md section 3, DRO and
    reward-partition), where ddof 0 and ddof 1 agree to O(1/N). The std is floored at the
    dtype's machine epsilon, so constant rewards map to zeros instead of NaN.
    """
    r = as_float(rewards.detach())
    std = r.std(correction=0).clamp(min=torch.finfo(r.dtype).eps)
    return (r - r.mean()) / std


def zscore_rewards(sequences: list, cfg=None) -> None:
    """Replace every training sequence's reward by its z-score over the whole training set (DRO
    and reward partitioning standardise rewards once, before training). A spec's `prepare`."""
    standard = zscore(torch.tensor([s.reward for s in sequences], dtype=torch.float64)).tolist()
    for s, r in zip(sequences, standard):
        s.reward = r
