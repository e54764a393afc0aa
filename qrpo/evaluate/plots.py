"""Comparison plots (matplotlib, Agg): reward against KL, reward/win-rate bars, length histograms."""

from __future__ import annotations

import math
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _num(x) -> float:
    return math.nan if x is None else float(x)


def reward_vs_kl(summary: dict[str, dict], out: Path) -> Path:
    """One point per model: KL estimate (k1) to the reference against mean reward, with the
    length-controlled reward as a hollow marker."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for i, (name, s) in enumerate(summary.items()):
        kl = _num(s.get("kl_k1")) if s.get("kl_k1") is not None else 0.0
        color = f"C{i}"
        ax.scatter([kl], [_num(s["mean_reward"])], color=color, s=50, label=name, zorder=3)
        ax.scatter([kl], [_num(s["lc_reward"])], facecolors="none", edgecolors=color, s=50)
        ax.annotate(name, (kl, _num(s["mean_reward"])), textcoords="offset points", xytext=(5, 4))
    ax.set_xlabel("KL to the reference (k1, nats per sequence)")
    ax.set_ylabel("mean reward (hollow: length-controlled)")
    ax.set_title("reward against KL", fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def bars(summary: dict[str, dict], out: Path, metrics: list[str]) -> Path:
    """Grouped bars, one group per metric (reward, LC reward, win rates, pass@k), one bar per
    model."""
    plt = _plt()
    names = list(summary)
    fig, ax = plt.subplots(figsize=(1.6 + 1.3 * len(metrics) * max(len(names), 2) / 3, 3.8))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        values = [_num(summary[name].get(m)) for m in metrics]
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(metrics))]
        ax.bar(xs, values, width, label=name, color=f"C{i}")
    ax.set_xticks(range(len(metrics)), metrics, fontsize=8)
    ax.axhline(0.5, color="gray", lw=0.6, ls="--")
    ax.legend(fontsize=8)
    ax.set_title("reward and win rate against the reference", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def lengths(per_model_lengths: dict[str, list[float]], out: Path, unit: str) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.5))
    values = [v for vs in per_model_lengths.values() for v in vs]
    lo, hi = (min(values), max(values)) if values else (0, 1)
    bins = min(30, max(int(hi - lo) + 1, 5))
    for i, (name, vs) in enumerate(per_model_lengths.items()):
        ax.hist(vs, bins=bins, range=(lo, hi + 1), histtype="step", color=f"C{i}", label=name)
    ax.set_xlabel(f"completion length ({unit})")
    ax.set_ylabel("samples")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
