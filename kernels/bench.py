"""Benchmark of per-sequence log-probs from the LM head: our kernels against the usual baselines.

    python -m kernels.bench               # GPU: Llama-3-8B, Qwen2.5-7B heads, N in {4096, 16384}
    python -m kernels.bench --device cpu  # CPU: N=4096, D=256, V=32000 fp32 (Triton skipped)
    python -m kernels.bench --compile     # also time the naive version under torch.compile
    python -m kernels.bench --tokens 8192 --methods triton liger(none)   # a subset

Methods (kernels/bench_methods.py): ours ("triton", "torch"), "naive" eager (full logits),
"naive+compile", our fused head+loss passes "fused-qrpo" and "fused-dpo", Liger-Kernel's fused
linear cross-entropy with reduction="none" (per-token losses summed per sequence, gradients
recomputed in backward like ours) and "mean" (its fast path that computes the gradient inside
forward; no per-token values, so no per-sequence error), Liger's `LigerFusedLinearDPOLoss`
("liger-dpo"), and Cut Cross-Entropy when importable. Liger and CCE need CUDA. For the fused
methods "fwd ms" is the log-prob forward alone (without gradients nothing is fused) and
"f+b ms" the fused pass plus its backward.

Reported per (shape, method): forward and forward+backward time (best of --repeats: robust to
other jobs on a shared machine, and on a dedicated GPU it is within noise of the median; the
matmul peak below is a best time too, so the ratio is like for like), peak extra memory
beyond inputs and gradients, achieved TFLOP/s counting one GEMM unit (2*N*D*V FLOP) for forward
and, for forward+backward, four units for two-pass methods (forward, logits recompute, dH, dW)
and three for gradient-in-forward ones (fused-*, liger(mean), liger-dpo), the percentage of that
floor (the units at the matmul peak measured on this device in the benchmark dtype), and the max
and mean per-sequence |log-prob error| against a float64 reference. The Triton tile
configuration of each shape is printed (kernels/tiles.py), and the issue's goals are checked at
the N = 16,384 GPU shapes.

Memory: on CUDA, torch.cuda.max_memory_allocated over the call minus the memory before it and
minus the returned gradients. On CPU there is no allocator counter, so the process's peak
resident set (VmHWM, reset through /proc/self/clear_refs) is used, after pinning glibc's mmap
threshold at 64 KiB so that every large tensor is its own mapping and freeing it really returns
it; the number is then peak RSS - RSS before the call - gradient bytes. It includes allocator
and page-granularity overheads, so it is an upper bound on what the tensors need.

Writes results.json, results.csv and results.png (bar charts) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import ctypes
import gc
import json
import math
import os
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from common.constants import IGNORE_INDEX
from kernels.bench_methods import GEMM_UNITS, Method, available_methods, method_context
from kernels.tiles import current_config, describe


@dataclass(frozen=True)
class Shape:
    name: str
    tokens: int
    dim: int
    vocab: int
    dtype: str
    seq_len: int


GPU_SHAPES = [
    Shape(f"{model} N={n}", n, d, v, "bfloat16", 1000)
    for model, d, v in (("llama3-8b", 4096, 128256), ("qwen2.5-7b", 3584, 152064))
    for n in (4096, 16384)
]
CPU_SHAPES = [Shape("cpu N=4096", 4096, 256, 32000, "float32", 256)]


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


# ---------------------------------------------------------------------------------------------
# Inputs and the float64 reference
# ---------------------------------------------------------------------------------------------


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


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int) -> float:
    """Best wall time of fn over `repeats` calls, in ms (CUDA synchronised around each call)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return min(times)


def matmul_peak_tflops(device: torch.device, dtype: torch.dtype, shapes: list[Shape]) -> float:
    """Measured dense matmul throughput on this device and dtype: the denominator of the floor.

    The best time over repeats of a square GEMM and of each shape's own head GEMM
    [N, D] x [D, V]; the highest throughput wins, so the floor is never optimistic for us.
    """
    sizes = [(8192, 8192, 8192) if device.type == "cuda" else (2048, 2048, 2048)]
    sizes += [(s.tokens, s.dim, s.vocab) for s in shapes]
    best = 0.0
    for m, k, n in sizes:
        a = torch.randn(m, k, device=device, dtype=dtype)
        b = torch.randn(k, n, device=device, dtype=dtype)
        times = []
        for _ in range(6):
            _sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            _sync(device)
            times.append(time.perf_counter() - t0)
        best = max(best, 2 * m * k * n / min(times[1:]) / 1e12)  # first call is warm-up
        del a, b
    return best


def _pin_malloc() -> None:
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
    _pin_malloc()
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


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


TABLE_HEAD = (
    f"{'shape':<22} {'method':<14} {'fwd ms':>9} {'f+b ms':>9} {'extra MiB':>10} "
    f"{'fwd TF/s':>9} {'f+b TF/s':>9} {'% floor':>8} {'max|err|':>9} {'mean|err|':>9}"
)


def table_row(r: Result) -> str:
    if r.note:
        return f"{r.shape:<22} {r.method:<14} {r.note}"
    return (
        f"{r.shape:<22} {r.method:<14} {_fmt(r.fwd_ms, '9.1f')} {_fmt(r.fwd_bwd_ms, '9.1f')} "
        f"{_fmt(r.peak_extra_mib, '10.1f')} {_fmt(r.fwd_tflops, '9.2f')} "
        f"{_fmt(r.fwd_bwd_tflops, '9.2f')} {_fmt(r.pct_of_floor, '8.1f')} "
        f"{_fmt(r.max_seq_err, '9.1e')} {_fmt(r.mean_seq_err, '9.1e')}"
    )


def print_table(results: list[Result]) -> None:
    print(TABLE_HEAD)
    print("-" * len(TABLE_HEAD))
    for r in results:
        print(table_row(r))


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in results if not r.note]
    shapes = list(dict.fromkeys(r.shape for r in done))
    methods = list(dict.fromkeys(r.method for r in done))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    width = 0.8 / max(len(methods), 1)
    for ax, key, label in (
        (axes[0], "fwd_bwd_ms", "forward+backward (ms)"),
        (axes[1], "peak_extra_mib", "peak extra memory (MiB)"),
    ):
        for i, m in enumerate(methods):
            vals = [
                next((getattr(r, key) or 0 for r in done if r.shape == s and r.method == m), 0)
                for s in shapes
            ]
            ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=m)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))], shapes, fontsize=8)
        ax.set_ylabel(label)
        if key == "peak_extra_mib":
            ax.set_yscale("log")  # naive and fused methods differ by orders of magnitude
    axes[0].legend(fontsize=8)
    fig.suptitle("per-sequence log-probs from the LM head")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# The issue's targets at the N = 16,384 GPU shapes: (shape prefix, method, f+b ms limit).
TIME_GOALS = [
    ("llama3-8b N=16384", "triton", 110.0),
    ("qwen2.5-7b N=16384", "triton", 125.0),
    ("llama3-8b N=16384", "fused-qrpo", 80.0),
    ("llama3-8b N=16384", "fused-dpo", 80.0),
]


def goals(results: list[Result]) -> list[str]:
    """One line per goal that this run measured: met or missed, with the figure."""
    done = {(r.shape, r.method): r for r in results if not r.note}
    lines = []

    def check(label: str, value: float | None, ok: bool) -> None:
        lines.append(f"goal {label}: {value:.4g} -> {'met' if ok else 'MISSED'}")

    for shape, method, limit in TIME_GOALS:
        r = done.get((shape, method))
        if r is not None:
            check(f"{shape} {method} f+b <= {limit} ms", r.fwd_bwd_ms, r.fwd_bwd_ms <= limit)
            if method == "triton":
                check(f"{shape} triton extra <= 512 MiB", r.peak_extra_mib, r.peak_extra_mib <= 512)
                check(f"{shape} triton max err <= 0.02", r.max_seq_err, r.max_seq_err <= 0.02)
        for peer in ("liger(mean)", "liger-dpo"):
            p = done.get((shape, peer))
            if r is not None and p is not None and method.startswith("fused"):
                check(f"{shape} {method} faster than {peer} ({p.fwd_bwd_ms:.1f} ms)",
                      r.fwd_bwd_ms, r.fwd_bwd_ms < p.fwd_bwd_ms)  # fmt: skip
    return lines


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    # Where and what
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tokens", type=int, nargs="*", help="override N for every shape")
    parser.add_argument("--methods", nargs="*", help="subset of methods to run")
    parser.add_argument("--compile", action="store_true", help="also run naive+compile")
    # Measurement
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (best is kept)")
    parser.add_argument("--out", default="runs/bench_kernels")
    args = parser.parse_args()

    device = torch.device(args.device)
    _pin_malloc()
    shapes = GPU_SHAPES if device.type == "cuda" else CPU_SHAPES
    if args.tokens:
        shapes = [
            Shape(s.name.split(" N=")[0] + f" N={n}", n, s.dim, s.vocab, s.dtype, s.seq_len)
            for s in {s.name.split(" N=")[0]: s for s in shapes}.values()
            for n in args.tokens
        ]
    repeats = args.repeats or (10 if device.type == "cuda" else 5)
    methods = available_methods(device, args.compile, shapes[0].seq_len)
    if args.methods:
        methods = {k: v for k, v in methods.items() if k in args.methods}

    device_name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else platform.processor() or "cpu"
    )
    meta = dict(
        device=device_name,
        torch=torch.__version__,
        commit=_git_commit(),
        threads=torch.get_num_threads(),
        load_avg_at_start=os.getloadavg()[0],
        peak_tflops={},
        tiles={},
    )
    results: list[Result] = []
    for shape in shapes:
        dtype = getattr(torch, shape.dtype)
        meta["tiles"][shape.name] = describe(current_config(device, dtype, shape.dim, shape.vocab))
        print(f"{shape.name}: triton tiles {meta['tiles'][shape.name]}", flush=True)
        if shape.dtype not in meta["peak_tflops"]:
            same = [s for s in shapes if s.dtype == shape.dtype]
            meta["peak_tflops"][shape.dtype] = matmul_peak_tflops(device, dtype, same)
        peak = meta["peak_tflops"][shape.dtype]
        inputs = make_inputs(shape, device)
        reference = fp64_reference(inputs)
        for name, method in methods.items():
            if isinstance(method, str):
                results.append(
                    Result(
                        shape.name,
                        name,
                        shape.tokens,
                        shape.dim,
                        shape.vocab,
                        shape.dtype,
                        note=method,
                    )
                )
                continue
            try:
                with method_context(method, device, dtype, shape.dim, shape.vocab):
                    results.append(bench_one(shape, name, method, inputs, reference, peak, repeats))
            except Exception as e:  # OOM or a missing feature must not stop the other methods
                results.append(
                    Result(
                        shape.name,
                        name,
                        shape.tokens,
                        shape.dim,
                        shape.vocab,
                        shape.dtype,
                        note=f"failed: {type(e).__name__}: {e}"[:160],
                    )
                )
            print(f"  {table_row(results[-1])}", flush=True)  # a killed run keeps its rows
            if device.type == "cuda":
                torch.cuda.empty_cache()
        del inputs, reference
        gc.collect()

    peaks = ", ".join(f"{k} {v:.3f}" for k, v in meta["peak_tflops"].items())
    print(
        f"device: {device_name}, torch {torch.__version__}, threads {meta['threads']}, "
        f"load avg at start {meta['load_avg_at_start']:.2f}, matmul peak (TF/s): {peaks}"
    )
    print_table(results)
    for name, tiles in meta["tiles"].items():
        print(f"tiles {name}: {tiles}")
    meta["goals"] = goals(results)
    for line in meta["goals"]:
        print(line)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    (out / "results.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["device", "commit"])
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, device=device_name, commit=meta["commit"]))
    plot(results, out / "results.png")
    print(f"wrote {out}/results.json, results.csv, results.png")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
