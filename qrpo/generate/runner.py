"""Running one step of the generation pipeline on this process's shard, and the steps' CLI.

The step modules (sample, reward, build, ref_logps, merge) hand their own `make_worker` or merge
function to this module; qrpo/generate/pipeline.py names the steps in order. So a step module imports
this runner and the pipeline imports the steps, never the other way round.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from qrpo.common import config
from qrpo.common.config import ConfigError, parse_config, to_yaml
from qrpo.common.data import DataError
from qrpo.common.model_files import check_model_path
from qrpo.common.writable import check_writable
from qrpo.generate.config import PipelineConfig, fingerprint, step_input
from qrpo.generate.records import read_data_groups, units_of
from qrpo.generate.shards import (
    ShardError,
    assign,
    collect,
    resolve_shard,
    run_shard,
    shard_counts,
    shard_name,
)

MakeWorker = Callable[[PipelineConfig, str], Callable]


def log(message: str) -> None:
    print(message, flush=True)


def read_units(
    cfg: PipelineConfig, source: str, from_step: bool, shard: int, num_shards: int
) -> list[list[dict]]:
    """This shard's units (a prompt's rows) of a step's input: the step before's own shard
    when the shard counts match, else all of it (checked complete) re-assigned; or a data file."""
    path = Path(source)
    counts = shard_counts(path)
    if from_step and not counts:
        raise ShardError(
            f"input {path} has no shards: run step {path.name} first, or start `steps` later"
        )
    if not from_step:
        groups, _ = read_data_groups(dataclasses.replace(cfg.data, path=source))
        return assign(units_of(groups), shard, num_shards)
    same = num_shards in counts
    got = collect(path, num_shards if same else 0, only=shard if same else None)
    if got.problems:
        raise ShardError(
            f"input {path} is not complete:\n  " + "\n  ".join(got.problems[:20]) + "\nRun that "
            "step for every shard first."
        )
    units = units_of(got.rows)
    return units if same else assign(units, shard, num_shards)


def run_shard_step(
    cfg: PipelineConfig, step: str, make_worker: MakeWorker, log: Callable[[str], None] = log
):
    """One sharded step for this process's shard; returns its manifest."""
    shard, num_shards = resolve_shard(cfg.shard, cfg.num_shards)
    source, from_step = step_input(cfg, step)
    folder = Path(cfg.out) / step / shard_name(shard, num_shards)
    if not (folder / "manifest.json").is_file():
        log(f"{step} {folder.name}: input {source}, output {folder}")
    return run_shard(
        step,
        Path(cfg.out),
        shard,
        num_shards,
        units=lambda: read_units(cfg, source, from_step, shard, num_shards),
        chunk_size=cfg.chunk_size,
        config=fingerprint(cfg, step),
        # Rows keep their row in the pipeline's first input (source_row): errors name that file.
        make_worker=lambda: make_worker(cfg, cfg.data.path or source),
        log=log,
        resolved_config=to_yaml(cfg),
        overwrite=cfg.overwrite,
    )


def cli(
    step: str, argv: list[str] | None, description: str, run: Callable[[PipelineConfig], object]
):
    """Command-line entry of one step (or `pipeline`): the shared config tree, then `run`."""
    cfg = parse_config(
        PipelineConfig, argv, prog=f"python -m qrpo.generate.{step}", description=description
    )
    check_paths(cfg, list(cfg.steps) if step == "pipeline" else [step])
    return run(cfg)


def check_paths(cfg: PipelineConfig, steps: list[str]) -> None:
    """The models these steps load, and the output folder, before any step starts: a missing
    model path is one line naming its key, not a hub error after the first step's work."""
    if {"sample", "ref_logps"} & set(steps):
        check_model_path("model.name_or_path", cfg.model.name_or_path)
        check_model_path("model.tokenizer", cfg.model.tokenizer, weights=False)
    if "reward" in steps and cfg.reward.fn == "model":
        check_model_path("reward.model", cfg.reward.model)
    check_writable("out", cfg.out)


def exit_on_error(main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run a step's main; a config, data or shard failure ends with its message, exit code 2."""
    config.exit_on_error(main, argv, (ConfigError, DataError, ShardError, ValueError))
