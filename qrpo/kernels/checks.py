"""Checks shared by the public entry points (qrpo/kernels/logprobs_api.py, qrpo/kernels/qrpo_api.py,
qrpo/kernels/fused_head.py): which backend runs, and value checks grouped into one host transfer.

Checks of tensor *values* need a device-to-host copy on CUDA, so each entry point gathers its
value checks as boolean tensors and reads them all at once with `raise_first_failure`.
"""

from __future__ import annotations

import torch
from torch import Tensor


def resolve_backend(backend: str, device: torch.device, allowed: tuple[str, ...]) -> str:
    """The backend that runs: `backend` itself, or for "auto" triton on CUDA and torch elsewhere."""
    if backend not in allowed:
        raise ValueError(f"backend must be one of {allowed}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" else "torch"
    return backend


def raise_first_failure(failures: list[tuple[Tensor, str]]) -> None:
    """Evaluate several boolean-tensor checks with one host transfer; raise the first failure."""
    if not failures:
        return
    flags = torch.stack([f.reshape(()) for f, _ in failures]).tolist()
    for bad, (_, message) in zip(flags, failures):
        if bad:
            raise ValueError(message)
