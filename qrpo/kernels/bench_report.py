"""The output of `python -m qrpo.kernels.bench`: the table, the bar charts, the issue's goals and the
result files."""

from __future__ import annotations

import csv
import json
from dataclasses import asdict
from pathlib import Path

from qrpo.kernels.bench_measure import Result


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


def write_results(out: Path, meta: dict, results: list[Result]) -> None:
    """results.json (meta and rows), results.csv (rows with device and commit), results.png."""
    out.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in results]
    (out / "results.json").write_text(json.dumps(dict(meta=meta, results=rows), indent=2))
    with open(out / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]) + ["device", "commit"])
        writer.writeheader()
        for row in rows:
            writer.writerow(dict(row, device=meta["device"], commit=meta["commit"]))
    plot(results, out / "results.png")
