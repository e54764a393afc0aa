"""Benchmark of per-sequence log-probs from the LM head: our kernels against the usual baselines.

    python -m qrpo.kernels.bench               # GPU: Llama-3-8B, Qwen2.5-7B heads, N in {4096, 16384}
    python -m qrpo.kernels.bench --device cpu  # CPU: N=4096, D=256, V=32000 fp32 (Triton skipped)
    python -m qrpo.kernels.bench --compile     # also time the naive version under torch.compile
    python -m qrpo.kernels.bench --tokens 8192 --methods triton liger(none)   # a subset

Methods (qrpo/kernels/bench_methods.py): ours ("triton", "torch"), "naive" eager (full logits),
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
configuration of each shape is printed (qrpo/kernels/tiles.py), and the issue's goals are checked at
the N = 16,384 GPU shapes.

Memory is measured as qrpo/kernels/bench_measure.py describes.

Writes results.json, results.csv and results.png (bar charts) to --out.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import subprocess
from pathlib import Path

import torch

from qrpo.common.flops import measure_peak_tflops
from qrpo.kernels.bench_measure import (
    Result,
    Shape,
    bench_one,
    fp64_reference,
    make_inputs,
    not_run,
    pin_malloc,
)
from qrpo.kernels.bench_methods import available_methods, method_context
from qrpo.kernels.bench_report import goals, print_table, table_row, write_results
from qrpo.kernels.tiles import current_config, describe

GPU_SHAPES = [
    Shape(f"{model} N={n}", n, d, v, "bfloat16", 1000)
    for model, d, v in (("llama3-8b", 4096, 128256), ("qwen2.5-7b", 3584, 152064))
    for n in (4096, 16384)
]
CPU_SHAPES = [Shape("cpu N=4096", 4096, 256, 32000, "float32", 256)]


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True)
        return out.stdout.strip() or "uncommitted"
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m qrpo.kernels.bench", description=__doc__.split("\n\n")[0]
    )
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
    pin_malloc()
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
            # The floor: the best of a square GEMM and each shape's own head GEMM [N, D] x [D, V].
            heads = [(s.tokens, s.dim, s.vocab) for s in shapes if s.dtype == shape.dtype]
            meta["peak_tflops"][shape.dtype] = measure_peak_tflops(device, dtype, gemms=heads)
        peak = meta["peak_tflops"][shape.dtype]
        inputs = make_inputs(shape, device)
        reference = fp64_reference(inputs)
        for name, method in methods.items():
            if isinstance(method, str):
                results.append(not_run(shape, name, method))
                continue
            try:
                with method_context(method, device, dtype, shape.dim, shape.vocab):
                    results.append(bench_one(shape, name, method, inputs, reference, peak, repeats))
            except Exception as e:  # OOM or a missing feature must not stop the other methods
                results.append(not_run(shape, name, f"failed: {type(e).__name__}: {e}"[:160]))
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
    write_results(out, meta, results)
    print(f"wrote {out}/results.json, results.csv, results.png")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
