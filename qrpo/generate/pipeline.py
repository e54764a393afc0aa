r"""`python -m qrpo.generate.pipeline`: the reference-data pipeline, its steps in order, for one shard.

The embedded tiny task end to end, from the SFT reference that `python -m qrpo.pipelines.demo` writes
(256 prompts x 8 samples: about 15 s for the pipeline and 15 s for QRPO on 2 CPU cores):

    python -m qrpo.generate step=task out=runs/gen/data
    python -m qrpo.generate.pipeline data.path=runs/gen/data/train_prompts.jsonl out=runs/gen \
        model.name_or_path=runs/demo/sft/final sample.n=8 sample.max_new_tokens=24 \
        reward.fn=task build.regime=pointwise chunk_size=32
    python -m qrpo.train --config configs/train/qrpo_tiny.yaml model.name_or_path=runs/demo/sft/final \
        data.path=runs/gen/ref_logps.parquet ref.source=data

The same, one step at a time (each takes the same keys; see `--help`):

    python -m qrpo.generate.sample    ...   # OUT/sample     n samples per prompt
    python -m qrpo.generate.reward    ...   # OUT/reward     rewards, ref_rewards
    python -m qrpo.generate.build     ...   # OUT/build      training rows by regime
    python -m qrpo.generate.ref_logps ...   # OUT/ref_logps  reference log-probs of those rows
    python -m qrpo.generate.merge     ...   # OUT/ref_logps.parquet, checked complete

Many nodes: a SLURM array runs one shard per task (`shard`/`num_shards` default to
SLURM_ARRAY_TASK_ID - SLURM_ARRAY_TASK_MIN and SLURM_ARRAY_TASK_COUNT). Each task runs every
step on its own shard, reading only its own shard of the step before; the merge at the end
succeeds in whichever task finishes last (the others say it is waiting for shards). A rerun of
the same command skips finished shards and chunks, so requeued or killed tasks resume; a rerun
with another config (another model, sample.n, ...) or another input refuses, naming the changed
keys, unless overwrite=true (then the changed shards are made again). Each shard folder is
locked while a process writes it, so two processes on one shard refuse instead of mixing:

    sbatch --array=0-63 --gpus=1 --wrap "python -m qrpo.generate.pipeline --config gen.yaml"
    python -m qrpo.generate.merge --config gen.yaml        # or by hand, once all are done
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from qrpo.common.rewards import check_reward
from qrpo.common.run_lock import RunLockError
from qrpo.generate import build, ref_logps, reward, sample
from qrpo.generate.config import PipelineConfig
from qrpo.generate.merge import merge, merged_step
from qrpo.generate.runner import cli, exit_on_error, log, run_shard_step
from qrpo.generate.shards import resolve_shard, shard_name

# The sharded steps and the function that makes each one's worker; merge runs after them.
STEP_WORKERS = {
    "sample": sample.make_worker,
    "reward": reward.make_worker,
    "build": build.make_worker,
    "ref_logps": ref_logps.make_worker,
}


def run_step(cfg: PipelineConfig, step: str, log: Callable[[str], None] = log):
    """One step for this process's shard (merge: for all shards); returns its manifest or file."""
    if step == "merge":
        return merge(cfg, log)
    return run_shard_step(cfg, step, STEP_WORKERS[step], log)


def run_pipeline(cfg: PipelineConfig, log: Callable[[str], None] = log) -> dict:
    """Every step of cfg.steps in order. With several shards, merge runs only once every shard
    of its step has finished, so the last shard to finish merges."""
    results = {}
    _, num_shards = resolve_shard(cfg.shard, cfg.num_shards)
    if "reward" in cfg.steps:  # a reward that cannot be called stops before sampling, not after
        check_reward(cfg.reward)
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
                    f"{waiting[:5]}); the last to finish merges, or run python -m qrpo.generate.merge"
                )
                continue
        try:
            results[step] = run_step(cfg, step, log)
        except RunLockError as err:
            if step != "merge" or num_shards == 1:
                raise
            # Two array tasks finished last together: the other one is merging the same files.
            log(f"merge: skipped, another task is merging: {err}")
    return results


def main(argv: list[str] | None = None) -> None:
    cli("pipeline", argv, __doc__, run_pipeline)


def console_main() -> None:
    """The console script `qrpo-generate`: `main` whose expected failures end in one line, exit 2."""
    exit_on_error(main, sys.argv[1:])


if __name__ == "__main__":
    console_main()
