"""FLOP counts, a measured matmul peak and peak memory: the figures behind MFU."""

from __future__ import annotations

import resource
import sys
import time

import torch


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: all of them, except an input embedding
    that is not tied to the head (a lookup, not a matmul)."""
    total = sum(p.numel() for p in model.parameters())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or emb.weight is not head.weight:
        total -= emb.weight.numel()
    return total


def train_flops_per_token(model: torch.nn.Module, *, with_reference: bool = False) -> float:
    """6N per trained token (forward 2N, backward 4N), plus 2N for an on-the-fly reference
    forward (attention-score FLOPs are not counted)."""
    n = matmul_params(model)
    return 6.0 * n + (2.0 * n if with_reference else 0.0)


def measure_peak_tflops(device: torch.device | str, dtype: torch.dtype = torch.float32) -> float:
    """Achieved TFLOP/s of a large square matmul on `device` in `dtype` (the MFU denominator)."""
    device = torch.device(device)
    n = 8192 if device.type == "cuda" else 1024
    if device.type == "cpu":
        dtype = torch.float32  # CPU MFU is quoted against fp32 matmul throughput
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(2):
        a @ b
    _sync(device)
    reps, t0 = 0, time.perf_counter()
    while True:
        a @ b
        reps += 1
        _sync(device)
        if time.perf_counter() - t0 > 0.5 and reps >= 3:
            break
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
