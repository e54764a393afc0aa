"""The frontier's evaluation records: the hash that ties runs to their reference samples, and the
table (Markdown, JSON, CSV) and plot built from the runs' frontier_eval.json files.

One row per curve x beta: the mean over seeds and its standard error (sample std / sqrt(n); none
with one seed) of each metric. `reward_gain` is the run's held-out reward minus its own seed's
reference reward, so the seed-to-seed spread of the reference does not enter its error bar.

KL is placed on the plot at the median over seeds of each run's k3, with bars from the smallest
to the largest seed. A run's k3 is a mean of exp(-r) - 1 + r over its samples (r = log-ratio
policy/reference): a single held-out sample that the policy scores far below the reference
(a completion cut at max_new_tokens then closed with EOS, or text that re-tokenizes
differently; qrpo/evaluate/evaluate.py) adds exp(|r|)/n, so one seed can read 10^2 to 10^4 nats
where the others read 1. The mean over seeds is kept in the table (`kl_k3`), next to the median
(`kl_k3_median`) and k1.
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
from pathlib import Path

# (column, metrics key or None for the gain over the reference, what it is)
METRICS = [
    ("reward", "mean_reward", "mean held-out reward"),
    ("reward_gain", None, "reward minus the same seed's reference reward"),
    ("lc_reward", "lc_reward", "length-controlled reward"),
    ("kl_k3", "kl_k3", "KL(policy || reference), k3 estimate, nats per sequence"),
    ("kl_k1", "kl_k1", "KL, k1 estimate (mean log-ratio)"),
    ("win_rate", "win_rate", "per-prompt win rate against the reference"),
    ("length", "mean_length", "mean completion length (tokens)"),
]


def beta_text(beta) -> str:
    """A beta as its run folder names it: the short form (0.1, 1, 1e-05) where that reads back
    as the same float, else the exact one (0.1000001 is not 0.1's folder)."""
    beta = float(beta)
    short = f"{beta:g}"
    return short if float(short) == beta else repr(beta)


def reference_samples_hash(samples_file: Path, reference: str) -> str:
    """SHA-256 of the reference's held-out samples (prompt, sample index, completion)."""
    digest = hashlib.sha256()
    for line in samples_file.read_text().splitlines():
        rec = json.loads(line)
        if rec["model"] == reference:
            key = [rec["prompt_index"], rec["sample"], rec["completion"]]
            digest.update((json.dumps(key) + "\n").encode())
    return digest.hexdigest()


def mean_se(values: list[float]) -> tuple[float, float]:
    xs = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not xs:
        return math.nan, math.nan
    m = math.fsum(xs) / len(xs)
    if len(xs) < 2:
        return m, math.nan
    var = math.fsum((x - m) ** 2 for x in xs) / (len(xs) - 1)
    return m, math.sqrt(var / len(xs))


def _value(record: dict, key: str | None) -> float | None:
    if key is None:
        return record["metrics"]["mean_reward"] - record["reference"]["mean_reward"]
    return record["metrics"].get(key)


def aggregate(records: list[dict], curve_order: list[str]) -> list[dict]:
    """One row per (curve, beta), in curve order then by beta; seeds averaged."""
    groups: dict[tuple[str, float], list[dict]] = {}
    for r in records:
        groups.setdefault((r["curve"], float(r["beta"])), []).append(r)
    rank = {name: i for i, name in enumerate(curve_order)}
    rows = []
    for (curve, beta), group in sorted(groups.items(), key=lambda g: (rank[g[0][0]], g[0][1])):
        row = {"curve": curve, "beta": beta, "k": group[0]["k"], "seeds": len(group)}
        for col, key, _ in METRICS:
            row[col], row[f"{col}_se"] = mean_se([_value(r, key) for r in group])
        kl = sorted(r["metrics"]["kl_k3"] for r in group)
        row["kl_k3_median"] = (
            kl[len(kl) // 2] if len(kl) % 2 else (kl[len(kl) // 2 - 1] + kl[len(kl) // 2]) / 2
        )
        row["kl_k3_min"], row["kl_k3_max"] = kl[0], kl[-1]
        rows.append(row)
    return rows


def reference_row(records: list[dict]) -> dict:
    """The reference itself, once per seed (every run of a seed shares it)."""
    by_seed = {r["seed"]: r["reference"] for r in records}
    row = {"curve": "reference", "beta": math.nan, "k": None, "seeds": len(by_seed)}
    for col, key, _ in METRICS:
        values = [0.0 if key is None else ref.get(key) for ref in by_seed.values()]
        row[col], row[f"{col}_se"] = mean_se(values)
    row["kl_k3_median"] = row["kl_k3_min"] = row["kl_k3_max"] = 0.0
    return row


def _num(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def markdown(rows: list[dict], ref: dict, records: list[dict]) -> str:
    shown = ["reward", "reward_gain", "lc_reward", "kl_k3", "kl_k3_median", "kl_k1", "win_rate"]
    head = ["curve", "beta", "K", "seeds", *shown]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    for row in [ref, *rows]:
        beta = "-" if row["curve"] == "reference" else beta_text(row["beta"])
        cells = [row["curve"], beta, _num(row["k"]), str(row["seeds"])]
        for col in shown:
            se = row.get(f"{col}_se", math.nan)
            cells.append(_num(row[col]) + ("" if not math.isfinite(se) else f" ± {se:.3f}"))
        lines.append("| " + " | ".join(cells) + " |")
    hashes = sorted({(r["seed"], r["reference_samples_sha256"][:12]) for r in records})
    legend = "\n".join(f"- `{col}`: {text}" for col, _, text in METRICS if col in shown)
    legend += "\n- `kl_k3_median`: median over seeds of k3 (the plot's x; see frontier_report.py)"
    return (
        "# Reward-KL frontier\n\n"
        "Mean over seeds ± standard error. Every run of a seed was evaluated against the same "
        "reference samples (sha256 per seed: "
        + ", ".join(f"seed {s} `{h}`" for s, h in hashes)
        + ").\n\n"
        + legend
        + "\n\n"
        + "\n".join(lines)
        + "\n"
    )


def write_csv(rows: list[dict], path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in row.items()})
    return path


def plot(rows: list[dict], ref: dict, curve_order: list[str], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("reward", "held-out reward"), ("lc_reward", "length-controlled reward")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = "osD^vP*Xh<>"
    for ax, (col, label) in zip(axes, panels):
        ax.axhline(ref[col], color="0.4", ls="--", lw=1, label="reference (KL 0)")
        for i, name in enumerate(curve_order):
            pts = sorted((r for r in rows if r["curve"] == name), key=lambda r: r["kl_k3_median"])
            if not pts:
                continue
            kl = [r["kl_k3_median"] for r in pts]
            ax.errorbar(
                kl,
                [r[col] for r in pts],
                xerr=[
                    [m - r["kl_k3_min"] for m, r in zip(kl, pts)],
                    [r["kl_k3_max"] - m for m, r in zip(kl, pts)],
                ],
                yerr=[0.0 if not math.isfinite(r[f"{col}_se"]) else r[f"{col}_se"] for r in pts],
                marker=markers[i % len(markers)],
                ms=5,
                capsize=2,
                lw=1.2,
                color=f"C{i}",
                label=name,
            )
            for r in pts:
                ax.annotate(
                    beta_text(r["beta"]),
                    (r["kl_k3_median"], r[col]),
                    textcoords="offset points",
                    xytext=(3, 3),
                    fontsize=6,
                    color=f"C{i}",
                )
        if all(r["kl_k3_min"] > 0 for r in rows):
            ax.set_xscale("log")
        ax.set_xlabel("KL to the reference (k3, nats/sequence; median and range over seeds)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        seeds = max(r["seeds"] for r in rows)
        ax.set_title(
            f"{label} (mean ± s.e. over {seeds} seeds) against KL; labels: beta", fontsize=9
        )
    axes[0].legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_clean(v) for v in x]
    return x


def write_report(records: list[dict], curves: list, out: Path) -> dict:
    """frontier.md, frontier.json, frontier.csv and frontier.png under `out`."""
    order = [c.name for c in curves]
    rows = aggregate(records, order)
    ref = reference_row(records)
    files = {
        "markdown": str(out / "frontier.md"),
        "json": str(out / "frontier.json"),
        "csv": str(write_csv([ref, *rows], out / "frontier.csv")),
        "png": str(plot(rows, ref, order, out / "frontier.png")),
    }
    Path(files["markdown"]).write_text(markdown(rows, ref, records))
    report = {"rows": rows, "reference": ref, "runs": records, "files": files}
    Path(files["json"]).write_text(json.dumps(_clean(report), indent=2))
    return report
