"""The run's metrics log (RUN_DIR/metrics.jsonl) and what is made of it: tracker config, the
log cut back to a resumed checkpoint, and the training-curves figure."""

from __future__ import annotations

import json
import math
import os
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


def append_record(path: Path, text: str) -> None:
    """Append one complete record (ending in a newline) in a single write to an O_APPEND file,
    so that a kill leaves whole records, at worst a torn last one, never interleaved halves."""
    data = text.encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, data)
        while written < len(data):  # only on a short write (a full disk): the rest, in order
            written += os.write(fd, data[written:])
    finally:
        os.close(fd)


def _json_record(line: str) -> dict | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and isinstance(record.get("step"), int) else None


def truncate_log(path: Path, step: int) -> str:
    """After a resume, drop log records of steps the checkpoint does not contain, and any record
    a kill tore (no newline, or not JSON). Returns what was trimmed, for the log ('' if none)."""
    if not path.is_file():
        return ""
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    torn = lines.pop()  # '' when the file ends with a newline, else a record cut mid-write
    keep, bad = [], []
    for number, line in enumerate(lines, 1):
        record = _json_record(line) if line.strip() else {"step": -1}
        if record is None:
            bad.append(number)
        elif 0 <= record["step"] <= step:
            keep.append(line)
    path.write_text("".join(line + "\n" for line in keep))
    notes = []
    if torn:
        notes.append(f"a torn last record ({len(torn)} bytes without a newline)")
    if bad:
        notes.append(f"unreadable line(s) {', '.join(map(str, bad[:5]))}")
    return f"{path}: trimmed " + " and ".join(notes) if notes else ""


def trim_torn_yaml_list(path: Path) -> str:
    """A YAML list appended one entry per write (config_history.yaml): cut a torn last entry
    back to the last whole one. Returns what was trimmed ('' if nothing)."""
    import yaml

    if not path.is_file():
        return ""
    text = path.read_text(errors="replace")

    def whole(t: str) -> bool:
        if t and not t.endswith("\n"):
            return False
        try:
            return isinstance(yaml.safe_load(t) or [], list)
        except yaml.YAMLError:
            return False

    if whole(text):
        return ""
    cut = text
    while cut and not whole(cut):
        # Back to the start of the last entry: a line beginning with "- " at column 0.
        cut = cut[: max(cut.rstrip("\n").rfind("\n- ") + 1, 0)]
    path.write_text(cut)
    return f"{path}: trimmed a torn or unreadable tail ({len(text) - len(cut)} bytes)"


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
