"""The launcher's configuration: the SLURM fields, the command-line grammar, pre-submission checks.

    python -m qrpo.slurm.train --config TRAIN.yaml [train.key=value ...] [SLURM key=value ...]
                          [sweep.train.key=[v1,v2,...] ...] [--dry-run]

Every `key=value` whose first part names a field of `SlurmConfig` (nodes, partition, time, ...)
goes to the launcher; `sweep.KEY=[...]` adds an axis of a grid; everything else is a training
override, checked against the training config tree exactly as `python -m qrpo.train` would.
Problems are found here, before anything is submitted: an unknown partition, more nodes than it
has, a training config or data file that does not exist on this filesystem.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from qrpo.common.config import ConfigError, build_config, choice, config_help, doc
from qrpo.common.constants import SOURCE_ROOT

CLUSTERS = ("slurm", "local", "debug")


@dataclass
class SlurmConfig:
    """Where and how the jobs run. The same fields serve training, sweeps and generation."""

    cluster: str = choice(
        "slurm",
        CLUSTERS,
        "slurm, local (this machine, in the background, same code path), debug (in this process)",
    )
    nodes: int = doc(1, "nodes; one task per node runs the node's processes")
    gpus_per_node: int = doc(8, "GPUs per node (0: CPU-only; processes then talk over gloo)")
    processes_per_node: int = doc(0, "processes per node (0: gpus_per_node, or 1 without GPUs)")
    cpus_per_task: int = doc(0, "CPUs of each node's task (0: the cluster default, often 1)")
    mem_gb: int = doc(0, "memory per node in GB (0: the cluster default)")
    partition: str = doc("", "partition ('' for the cluster's default)")
    account: str = doc("", "account to charge ('' for your default)")
    qos: str = doc("", "quality of service ('' for the default)")
    constraint: str = doc("", "node features, as sbatch --constraint")
    time: str = doc("24:00:00", "time limit: minutes, HH:MM:SS or D-HH:MM:SS")
    job_name: str = doc("", "job name ('' : qrpo-<run dir name>)")
    signal_delay_s: int = doc(
        120, "SIGUSR2 arrives this long before the time limit: one checkpoint must fit in it"
    )
    max_requeues: int = doc(3, "requeues after hitting the time limit (preemptions do not count)")
    port: int = doc(0, "rendezvous port on the first node (0: derived from the job id)")
    accelerate_config: str = doc(
        "configs/accelerate/fsdp2_multi_node.yaml", "accelerate config file used on GPUs"
    )
    setup: list = doc([], "shell lines run before the job starts (module load, source ...)")
    env: dict = doc({}, "environment variables of the job's processes, e.g. env.NCCL_DEBUG=INFO")
    array_parallelism: int = doc(
        0, "array jobs (sweeps, shards): at most this many at once (0: all)"
    )
    dry_run: bool = doc(False, "print the plan and the sbatch script; submit nothing")
    wait: bool = doc(False, "wait for the jobs to end and print their results")

    def __post_init__(self):
        if self.nodes < 1:
            raise ConfigError("nodes must be >= 1")
        if self.gpus_per_node < 0 or self.processes_per_node < 0:
            raise ConfigError("gpus_per_node and processes_per_node must be >= 0")
        if self.cluster != "slurm" and self.nodes > 1:
            raise ConfigError(
                f"cluster={self.cluster} runs on this machine only: nodes must be 1 "
                f"(got {self.nodes}); use cluster=slurm for several nodes"
            )
        if self.signal_delay_s < 10:
            raise ConfigError("signal_delay_s must be >= 10 (the checkpoint is written in it)")
        time_minutes(self.time)  # raises on a malformed time

    @property
    def per_node(self) -> int:
        """Processes per node: one per GPU, or as asked, or one on CPU-only nodes."""
        return self.processes_per_node or self.gpus_per_node or 1


# --------------------------------------------------------------------------- parsing


def time_minutes(text: str) -> int:
    """SLURM's time formats -> whole minutes (rounded up): M, M:S, H:M:S, D-H, D-H:M, D-H:M:S."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise ConfigError(f"time='{text}' is not a SLURM time (M, H:M:S or D-H:M:S)")
    days, a, b, c = (int(x) if x is not None else None for x in m.groups())
    if days is not None:  # D-H, D-H:M, D-H:M:S
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # H:M:S
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # M:S
        seconds = a * 60 + b
    else:  # M
        seconds = a * 60
    if seconds <= 0:
        raise ConfigError(f"time='{text}' must be positive")
    return -(-seconds // 60)


@dataclass
class LaunchArgs:
    """A command line, split: the launcher's config, the task's config file and overrides, and
    the sweep grid (dotted key -> values)."""

    slurm: SlurmConfig
    config: str | None
    overrides: list[str]
    grid: dict[str, list]


def _key(item: str) -> str:
    return item.removeprefix("--").split("=", 1)[0]


def parse_launch_args(
    argv: list[str] | None,
    *,
    prog: str,
    description: str,
    task_help: list[str],
    sweep: bool = True,
    defaults: tuple[str, ...] = (),
) -> LaunchArgs:
    """`--config FILE`, `--slurm-config FILE`, `--dry-run`, then key=value items routed by key.

    `defaults` are SLURM items applied before the command line's (e.g. one GPU per shard)."""
    slurm_keys = {f.name for f in dataclasses.fields(SlurmConfig)}
    epilog = [
        "configuration keys (override as key=value): the SLURM keys, then the task's",
        "[SLURM]  where and how the jobs run",
        *config_help(SlurmConfig),
        "",
        *(
            [
                "sweep: sweep.KEY=[v1,v2,...] for any key of the task; the grid's points run as",
                "one job array, each in RUN_DIR/<point>/ (e.g. sweep.loss.beta=[0.1,0.3])",
                "",
            ]
            if sweep
            else []
        ),
        *task_help,
    ]
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog="\n".join(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="the task's YAML (as for the script run directly)")
    parser.add_argument(
        "--slurm-config", help="YAML with any of the SLURM keys (a cluster profile)"
    )
    parser.add_argument("--dry-run", action="store_true", help="print the plan; submit nothing")
    parser.add_argument("items", nargs="*", help="key=value: SLURM keys, task overrides, sweep.*")
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    slurm_items, overrides, grid = [], [], {}
    try:
        if args.slurm_config and Path(args.slurm_config).is_file():
            profile = OmegaConf.load(args.slurm_config)  # the profile wins over `defaults`
            defaults = tuple(d for d in defaults if _key(d) not in profile)
        slurm_items.extend(defaults)
        for item in [*args.items, *unknown]:
            item = item.removeprefix("--")
            if "=" not in item:
                raise ConfigError(f"argument '{item}' must look like key=value")
            key, value = item.split("=", 1)
            if key.split(".")[0] in slurm_keys:
                slurm_items.append(item)
            elif key.startswith("sweep.") and sweep:
                grid[key.removeprefix("sweep.")] = _grid_values(key, value)
            else:
                overrides.append(item)
        if args.dry_run:
            slurm_items.append("dry_run=true")
        slurm = build_config(SlurmConfig, args.slurm_config, slurm_items)
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")
    return LaunchArgs(slurm, args.config, overrides, grid)


def _grid_values(key: str, text: str) -> list:
    try:
        values = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]))["v"]
    except OmegaConfBaseException as err:
        raise ConfigError(f"{key}: cannot parse '{text}': {err}") from None
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{key} must be a non-empty list, e.g. {key}=[0.1,0.3]")
    return values


def override(key: str, value: Any) -> str:
    """A `key=value` item that OmegaConf reads back as `value` (JSON is YAML flow syntax)."""
    import json

    return f"{key}={json.dumps(value, separators=(',', ':'))}"


def task_config(cls: type, config: str | None, overrides: list[str]):
    """The task's typed config, built and checked as the script itself would."""
    if config is not None and not Path(config).is_file():
        raise ConfigError(f"--config: training/task config not found: {config}")
    return build_config(cls, config, overrides)


# --------------------------------------------------------------------------- checks


def _run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout


def check_cluster(cfg: SlurmConfig) -> None:
    """SLURM is reachable, the partition exists and has the nodes and GPUs asked for (or, run
    here, this machine has the GPUs)."""
    if cfg.dry_run:
        return
    if cfg.cluster != "slurm":
        import torch

        have = torch.cuda.device_count()
        if cfg.gpus_per_node > have:
            raise ConfigError(
                f"cluster={cfg.cluster}: gpus_per_node={cfg.gpus_per_node} but this machine has "
                f"{have} GPU(s); set gpus_per_node={have}"
            )
        return
    if shutil.which("sbatch") is None or shutil.which("sinfo") is None:
        raise ConfigError(
            "no SLURM commands (sbatch, sinfo) on this machine: run on a login node, or use "
            "cluster=local to run here"
        )
    try:
        listed = _run(["sinfo", "-h", "-o", "%P"]).split()
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise ConfigError(f"sinfo failed, is the SLURM controller up? {detail.strip()}") from None
    partitions = [p.rstrip("*") for p in listed]
    if cfg.partition and cfg.partition not in partitions:
        raise ConfigError(
            f"partition='{cfg.partition}' does not exist on this cluster; "
            f"partitions: {', '.join(partitions) or '(none)'}"
        )
    default = next((p.rstrip("*") for p in listed if p.endswith("*")), None)
    partition = cfg.partition or default
    if not partition:
        return
    name = f"partition '{partition}'"
    counts = _run(["sinfo", "-h", "-p", partition, "-o", "%D"]).split()
    total = sum(int(c) for c in counts if c.isdigit())
    if total and cfg.nodes > total:
        raise ConfigError(f"nodes={cfg.nodes} but {name} has {total} node(s)")
    if cfg.gpus_per_node:
        gres = _run(["sinfo", "-h", "-p", partition, "-o", "%G"]).split()
        gpus = [int(n) for g in gres for n in re.findall(r"gpu(?::[^:,()]+)?:(\d+)", g)]
        if not gpus:
            raise ConfigError(
                f"gpus_per_node={cfg.gpus_per_node} but {name} has no GPUs (gres: "
                f"{' '.join(gres) or 'none'}); use gpus_per_node=0 for CPU-only nodes"
            )
        if cfg.gpus_per_node > max(gpus):
            raise ConfigError(
                f"gpus_per_node={cfg.gpus_per_node} but {name} has at most {max(gpus)} per node"
            )


_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".yaml", ".yml", ".safetensors", ".bin")


def check_path(field: str, path: str, *, hub_ok: bool) -> None:
    """A path the job will read must exist here: the job sees this filesystem.

    A hub name (`org/name`, no file suffix) is let through where the field accepts one."""
    if not path or Path(path).exists():
        return
    if hub_ok and _HUB_NAME.fullmatch(path) and not path.endswith(_DATA_SUFFIXES):
        print(f"note: {field}={path} is not a local path; the job will load it from the hub")
        return
    raise ConfigError(f"{field}={path}: no such file or folder on this filesystem")


def check_accelerate_config(cfg: SlurmConfig) -> str:
    """The accelerate config of GPU runs, as an absolute path ('' on CPU-only nodes)."""
    if not cfg.gpus_per_node:
        return ""
    for base in (Path.cwd(), SOURCE_ROOT):
        path = (base / cfg.accelerate_config).resolve()
        if path.is_file():
            return str(path)
    raise ConfigError(f"accelerate_config={cfg.accelerate_config}: no such file")
