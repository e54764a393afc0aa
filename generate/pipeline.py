r"""`python -m generate.pipeline`: the reference-data pipeline, its steps in order, for one shard.

The embedded tiny task end to end, from the SFT reference that `python -m train.demo` writes
(256 prompts x 8 samples: about 15 s for the pipeline and 15 s for QRPO on 2 CPU cores):

    python -m generate step=task out=runs/gen/data
    python -m generate.pipeline data.path=runs/gen/data/train_prompts.jsonl out=runs/gen \
        model.name_or_path=runs/demo/sft/final sample.n=8 sample.max_new_tokens=24 \
        reward.fn=task build.regime=pointwise chunk_size=32
    python -m train --config configs/train/qrpo_tiny.yaml model.name_or_path=runs/demo/sft/final \
        data.path=runs/gen/ref_logps.parquet ref.source=data

The same, one step at a time (each takes the same keys; see `--help`):

    python -m generate.sample    ...   # OUT/sample     n samples per prompt
    python -m generate.reward    ...   # OUT/reward     rewards, ref_rewards
    python -m generate.build     ...   # OUT/build      training rows by regime
    python -m generate.ref_logps ...   # OUT/ref_logps  reference log-probs of those rows
    python -m generate.merge     ...   # OUT/ref_logps.parquet, checked complete

Many nodes: a SLURM array runs one shard per task (`shard`/`num_shards` default to
SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT). Each task runs every
step on its own shard, reading only its own shard of the step before; the merge at the end
succeeds in whichever task finishes last (the others say it is waiting for shards). A rerun of
the same command skips finished shards and chunks, so requeued or killed tasks resume:

    sbatch --array=0-63 --gpus=1 --wrap "python -m generate.pipeline --config gen.yaml"
    python -m generate.merge --config gen.yaml        # or by hand, once all are done
"""

from __future__ import annotations

import dataclasses
import importlib
import sys
from collections.abc import Callable
from pathlib import Path

from common.config import ConfigError, parse_config, to_yaml
from common.data import DataError
from generate.config import PipelineConfig, fingerprint, step_input
from generate.merge import MergeError, merge, merged_step
from generate.records import read_data_groups, units_of
from generate.shards import (
    ShardError,
    assign,
    collect,
    resolve_shard,
    run_shard,
    shard_counts,
    shard_name,
)


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


def run_step(cfg: PipelineConfig, step: str, log: Callable[[str], None] = log):
    """One step for this process's shard (merge: for all shards); returns its manifest or file."""
    if step == "merge":
        return merge(cfg, log)
    shard, num_shards = resolve_shard(cfg.shard, cfg.num_shards)
    source, from_step = step_input(cfg, step)
    module = importlib.import_module(f"generate.{step}")
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
        make_worker=lambda: module.make_worker(cfg, cfg.data.path or source),
        log=log,
        resolved_config=to_yaml(cfg),
    )


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = log) -> dict:
    """Every step of cfg.steps in order. With several shards, merge runs only once every shard
    of its step has finished, so the last shard to finish merges."""
    results = {}
    _, num_shards = resolve_shard(cfg.shard, cfg.num_shards)
    for step in cfg.steps:
        if step == "merge" and num_shards > 1:
            step_dir = Path(cfg.out) / merged_step(cfg)
            waiting = [
                s
                for s in range(num_shards)
                if not (step_dir / shard_name(s, num_shards) / "manifest.json").is_file()
            ]
            if waiting:
                log(
                    f"merge: {len(waiting)} shard(s) of {step_dir} still running (e.g. "
                    f"{waiting[:5]}); the last to finish merges, or run python -m generate.merge"
                )
                continue
        results[step] = run_step(cfg, step, log)
    return results


def cli(step: str, argv: list[str] | None, description: str):
    """Command-line entry of one step (or `pipeline`): the shared config tree, then the step."""
    cfg = parse_config(
        PipelineConfig, argv, prog=f"python -m generate.{step}", description=description
    )
    if step == "pipeline":
        return run_pipeline(cfg)
    return run_step(cfg, step)


def exit_on_error(main: Callable[[list[str]], object], argv: list[str]) -> None:
    """Run a step's main; a known failure ends with its message and exit code 2, no traceback."""
    try:
        main(argv)
    except (ConfigError, DataError, ShardError, MergeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> None:
    cli("pipeline", argv, __doc__)


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
