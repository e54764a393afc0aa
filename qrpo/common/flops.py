"""FLOP counts, a measured matmul peak and peak memory: the figures behind MFU."""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence

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


def measure_peak_tflops(
    device: torch.device | str,
    dtype: torch.dtype = torch.float32,
    *,
    gemms: Sequence[tuple[int, int, int]] = (),
    min_seconds: float = 0.5,
) -> float:
    """Achieved dense-matmul TFLOP/s on `device` in `dtype`: the MFU denominator of the training
    loop and the floor of `python -m qrpo.kernels.bench`.

    Each GEMM [m, k] x [k, n] (a large square one, 8192 on CUDA and 1024 on CPU, then any in
    `gemms`, e.g. a benchmark's own head GEMM) is timed call by call after one warm-up call, for
    `min_seconds` and at least three calls. The fastest call of the fastest GEMM sets the figure,
    so a ratio against it is never optimistic, and a benchmark's best-of times compare like for
    like. On CPU the dtype is float32 (CPU MFU is quoted against fp32 matmul throughput).
    """
    device = torch.device(device)
    if device.type == "cpu":
        dtype = torch.float32
    square = 8192 if device.type == "cuda" else 1024
    best = 0.0
    for m, k, n in [(square, square, square), *gemms]:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        torch.mm(a, b)  # warm-up: kernel selection and lazy initialisation
        times: list[float] = []
        while len(times) < 3 or sum(times) < min_seconds:
            synchronize(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            synchronize(device)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * m * k * n / min(times) / 1e12)
        del a, b
    return best


def peak_memory_gb(device: torch.device | str) -> float:
    """Peak allocated GPU memory, or the process's peak RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU), so wall-clock times are the work's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
