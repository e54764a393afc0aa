"""What `python -m qrpo.kernels.bench` measures for one (shape, method): inputs, the float64
reference, best-of wall times and peak extra memory.

Memory: on CUDA, torch.cuda.max_memory_allocated over the call minus the memory before it and
minus the returned gradients. On CPU there is no allocator counter, so the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) is used, after pinning glibc's mmap
threshold at 64 KiB so that every large tensor is its own mapping and freeing it really returns
it; the number is then peak RSS - RSS before the call - gradient bytes. It includes allocator
and page-granularity overheads, so it is an upper bound on what the tensors need.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qrpo.common.constants import IGNORE_INDEX
from qrpo.common.flops import synchronize
from qrpo.kernels.bench_methods import GEMM_UNITS, Method, available_methods


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    dim: int
    vocab: int
    dtype: str
    seq_len: int


@dataclass
class Result:
    shape: str
    method: str
    tokens: int
    dim: int
    vocab: int
    dtype: str
    fwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    peak_extra_mib: float | None = None
    fwd_tflops: float | None = None
    fwd_bwd_tflops: float | None = None
    gemm_units: int = 4
    pct_of_floor: float | None = None
    max_seq_err: float | None = None
    mean_seq_err: float | None = None
    note: str = ""


def not_run(shape: Shape, method: str, why: str) -> Result:
    """The row of a method that was not measured on this shape (unavailable, or failed), and why."""
    return Result(shape.name, method, shape.tokens, shape.dim, shape.vocab, shape.dtype, note=why)


def make_inputs(shape: Shape, device: torch.device, seed: int = 0) -> dict[str, Tensor]:
    """Hidden states and a head scaled so logits have std ~2 (like a trained LM head), packed
    sequences of seq_len tokens (the last one shorter), ~10% of targets ignored (prompt tokens)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    dtype = getattr(torch, shape.dtype)
    n, d, v = shape.tokens, shape.dim, shape.vocab
    hidden = torch.randn(n, d, generator=g).to(device, dtype)
    weight = (torch.randn(v, d, generator=g) * (2.0 / math.sqrt(d))).to(device, dtype)
    targets = torch.randint(0, v, (n,), generator=g)
    targets[torch.rand(n, generator=g) < 0.1] = IGNORE_INDEX
    bounds = list(range(0, n, shape.seq_len)) + [n]
    cu = torch.tensor(bounds, dtype=torch.int32)
    return dict(hidden=hidden, weight=weight, targets=targets.to(device), cu_seqlens=cu.to(device))


@torch.no_grad()
def fp64_reference(inputs: dict[str, Tensor]) -> Tensor:
    """Per-sequence log-probs in float64, one sequence at a time (bounded memory), written
    independently of the kernels: plain log_softmax on float64 logits."""
    hidden, targets, cu = inputs["hidden"], inputs["targets"], inputs["cu_seqlens"].tolist()
    w64 = inputs["weight"].double()
    out = torch.zeros(len(cu) - 1, dtype=torch.float64, device=hidden.device)
    for s in range(len(cu) - 1):
        h = hidden[cu[s] : cu[s + 1]].double()
        t = targets[cu[s] : cu[s + 1]]
        logp = torch.log_softmax(h @ w64.T, dim=-1)
        valid = t != IGNORE_INDEX
        out[s] = (logp.gather(1, torch.where(valid, t, 0)[:, None]).squeeze(1) * valid).sum()
        del logp
    return out


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Best wall time of fn over `repeats` calls, in ms (CUDA synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def pin_malloc() -> None:
    """Fix glibc's mmap threshold at 64 KiB (disables its dynamic growth up to 32 MiB), so a freed
    large tensor is unmapped at once and RSS tracks live tensor memory."""
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 64 * 1024)  # M_MMAP_THRESHOLD


def _proc_status_kib(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def peak_extra_bytes(step: Callable[[], int], device: torch.device) -> int:
    """Peak memory of step() beyond what existed before it, minus the bytes step() reports as
    results it keeps (the gradients). See the module docstring for the CPU method."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        kept = step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before - kept
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _proc_status_kib("VmRSS") * 1024
    kept = step()
    return _proc_status_kib("VmHWM") * 1024 - before - kept


def _fwd_bwd_step(method: Method, inputs: dict[str, Tensor]) -> Callable[[], int]:
    h = inputs["hidden"].detach().requires_grad_()
    w = inputs["weight"].detach().requires_grad_()

    def step() -> int:
        _, scalar = method(h, w, inputs["targets"], inputs["cu_seqlens"])
        scalar.backward()
        kept = h.grad.nbytes + w.grad.nbytes  # alive at the end: part of the peak, not extra
        h.grad = w.grad = None  # so that the next baseline does not include them
        return kept

    return step


def cpu_peak_extra_bytes(method: str, tokens: int, dim: int, vocab: int, seq_len: int) -> int:
    """Peak extra memory of one fp32 forward+backward on CPU; run it in a fresh process."""
    pin_malloc()
    device = torch.device("cpu")
    inputs = make_inputs(Shape("mem", tokens, dim, vocab, "float32", seq_len), device)
    step = _fwd_bwd_step(available_methods(device, False)[method], inputs)
    step()  # warm-up: thread pools and lazy initialisation are not the op's memory
    return peak_extra_bytes(step, device)


def bench_one(
    shape: Shape,
    name: str,
    method: Method,
    inputs: dict[str, Tensor],
    reference: Tensor,
    peak_tflops: float,
    repeats: int,
) -> Result:
    device = inputs["hidden"].device
    res = Result(shape.name, name, shape.tokens, shape.dim, shape.vocab, shape.dtype)
    unit = 2.0 * shape.tokens * shape.dim * shape.vocab  # one GEMM unit, FLOP
    h, w, t, cu = (inputs[k] for k in ("hidden", "weight", "targets", "cu_seqlens"))
    warmup = 1 if device.type == "cpu" else 3
    with torch.no_grad():
        out, _ = method(h, w, t, cu)
        if out is not None:
            err = (out.double() - reference).abs()
            res.max_seq_err, res.mean_seq_err = err.max().item(), err.mean().item()
        res.fwd_ms = time_ms(lambda: method(h, w, t, cu), device, repeats, warmup)
    step = _fwd_bwd_step(method, inputs)
    res.fwd_bwd_ms = time_ms(step, device, repeats, warmup)
    res.peak_extra_mib = peak_extra_bytes(step, device) / 2**20
    res.fwd_tflops = unit / (res.fwd_ms * 1e-3) / 1e12
    res.gemm_units = GEMM_UNITS.get(name, 4)
    res.fwd_bwd_tflops = res.gemm_units * unit / (res.fwd_bwd_ms * 1e-3) / 1e12
    res.pct_of_floor = 100.0 * res.fwd_bwd_tflops / peak_tflops
    return res
