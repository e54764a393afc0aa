"""A grid of overrides -> named points, one run directory each.

sweep.loss.beta=[0.1,0.3] sweep.optim.lr=[1e-4,3e-4]
-> beta0.1_lr0.0001, beta0.1_lr0.0003, beta0.3_lr0.0001, beta0.3_lr0.0003

A point's name is its run directory, so two points must never share one: floats are written
with repr (the shortest text that reads back as the same float: 0.1 and 0.1000001 stay apart,
where f"{v:g}" printed both as 0.1), and where cleaning a value for a path would still make two
names alike ("a/b" and "a-b"), each of those names ends in a short hash of its values. A value
listed twice on one axis is a ConfigError: it would run the same point twice, into one folder.
"""

from __future__ import annotations

import hashlib
import itertools
import json

from qrpo.common.config import ConfigError
from qrpo.slurm.config import override


def _fmt(value) -> str:
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "-".join(_fmt(v) for v in value)
    return str(value).replace("/", "-").replace(" ", "")


def _same(a, b) -> bool:
    """One value for the config: 1 and 1.0 set the same float key; True is not 1."""
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return a == b


def check_grid(grid: dict[str, list]) -> None:
    """Every axis lists distinct values."""
    for key, values in grid.items():
        for i, v in enumerate(values):
            for j in range(i):
                if _same(values[j], v):
                    raise ConfigError(
                        f"sweep.{key}={json.dumps(values)}: {json.dumps(v)} is listed twice "
                        f"(positions {j} and {i}); each grid point runs once, in its own folder"
                    )


def grid_points(grid: dict[str, list]) -> list[tuple[str, list[str]]]:
    """(name, overrides) for each point of the grid, in row-major order of the keys given.

    A point is named by the last part of each key and its value; keys whose last parts clash
    use their full dotted name instead."""
    if not grid:
        return []
    check_grid(grid)
    keys = list(grid)
    last = [k.split(".")[-1] for k in keys]
    short = {k: (s if last.count(s) == 1 else k.replace(".", "_")) for k, s in zip(keys, last)}
    points = []
    for combo in itertools.product(*(grid[k] for k in keys)):
        name = "_".join(f"{short[k]}{_fmt(v)}" for k, v in zip(keys, combo))
        points.append((name, [override(k, v) for k, v in zip(keys, combo)]))
    names = [name for name, _ in points]
    return [
        (f"{name}_{_digest(extra)}" if names.count(name) > 1 else name, extra)
        for name, extra in points
    ]


def _digest(overrides: list[str]) -> str:
    return hashlib.sha1("\n".join(overrides).encode()).hexdigest()[:8]
