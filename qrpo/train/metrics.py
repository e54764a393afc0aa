"""The run's metrics log (RUN_DIR/metrics.jsonl) and what is made of it: tracker config, the
log cut back to a resumed checkpoint, and the training-curves figure."""

from __future__ import annotations

import json
import math
from dataclasses import asdict
from pathlib import Path


def flat_config(cfg) -> dict:
    """The config as {"section.key": value} with scalar values, as trackers take it."""
    out = {}
    for section, values in asdict(cfg).items():
        for key, value in values.items():
            out[f"{section}.{key}"] = (
                value if isinstance(value, (int, float, str, bool)) else str(value)
            )
    return out


def truncate_log(path: Path, step: int) -> None:
    """After a resume, drop log records of steps the checkpoint does not contain."""
    if not path.is_file():
        return
    keep = [
        line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step
    ]
    path.write_text("".join(line + "\n" for line in keep))


def plot_curves(metrics_log: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics_log.read_text().splitlines() if line]
    if not records:
        return
    names = [n for n in ("loss", "grad_norm", "lr", "tokens_per_s") if n in records[0]]
    names += [n for n in records[0] if "/" in n][:8]
    cols = 4
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    steps = [r["step"] for r in records]
    for ax, name in zip(axes.flat, names):
        ax.plot(steps, [r.get(name, math.nan) for r in records])
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
