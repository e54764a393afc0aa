"""A grid of overrides -> named points, one run directory each.

sweep.loss.beta=[0.1,0.3] sweep.optim.lr=[1e-4,3e-4]
-> beta0.1_lr0.0001, beta0.1_lr0.0003, beta0.3_lr0.0001, beta0.3_lr0.0003
"""

from __future__ import annotations

import itertools

from qrpo.slurm.config import override


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    return str(value).replace("/", "-").replace(" ", "")


def grid_points(grid: dict[str, list]) -> list[tuple[str, list[str]]]:
    """(name, overrides) for each point of the grid, in row-major order of the keys given.

    A point is named by the last part of each key and its value; keys whose last parts clash
    use their full dotted name instead."""
    if not grid:
        return []
    keys = list(grid)
    last = [k.split(".")[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last)}
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = "_".join(f"{short[k]}{_fmt(v)}" for k, v in zip(keys, combo))
        points.append((name, [override(k, v) for k, v in zip(keys, combo)]))
    return points
