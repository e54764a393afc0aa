"""`python -m qrpo.slurm.generate`: the generation pipeline as a job array over shards, then a merge.

    python -m qrpo.slurm.generate --config gen.yaml num_shards=64 gpus_per_node=1 partition=gpu \
        time=4:00:00 cpus_per_task=8
    python -m qrpo.slurm.generate --config gen.yaml num_shards=4 steps=[reward] --dry-run
    python -m qrpo.slurm.generate --config gen.yaml num_shards=2 cluster=local gpus_per_node=0

Array task i runs `python -m qrpo.generate.pipeline --config OUT/slurm/generate.yaml shard=i
num_shards=N` over the config's steps less `merge`; a job that depends on the whole array
(`afterok`) then runs `python -m qrpo.generate.merge --config OUT/slurm/generate.yaml`, which checks
that every shard is complete and writes the one output file. A shard that is preempted or hits
its time limit is requeued and resumes at its first missing chunk (chunks are atomic). Without
SLURM (`cluster=local|debug`) the shards run here and the merge follows once they are done.

Keys other than the SLURM ones are the pipeline's (`python -m qrpo.generate.pipeline --help`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

from qrpo.common.config import ConfigError, config_help, save_config
from qrpo.slurm.config import (
    LaunchArgs,
    check_cluster,
    check_path,
    override,
    parse_launch_args,
    task_config,
)
from qrpo.slurm.job import CommandJob, make_executor, sbatch_script, wait


class GenerateJob(CommandJob):
    """One command, the same on its single node: a pipeline shard, or the merge."""

    def __init__(self, args: list[str], out: str, cwd: str, env: dict, grace_s: float):
        super().__init__(cwd=cwd, env=env, grace_s=grace_s)
        self.args = args
        self.out = out

    def command(self, env) -> list[str]:
        return [sys.executable, *self.args]

    def describe(self) -> dict:
        return {"out": str(Path(self.cwd, self.out))}


def plan(args: LaunchArgs):
    """The resolved pipeline config (checked) and the steps each shard runs."""
    try:
        from qrpo.generate.config import PipelineConfig
    except ImportError as err:
        raise ConfigError(f"the generation pipeline is not importable here: {err}") from None

    cfg = task_config(PipelineConfig, args.config, args.overrides)
    if cfg.num_shards < 1:
        raise ConfigError("give the number of shards: num_shards=N (the array has N tasks)")
    if cfg.shard >= 0:
        raise ConfigError(f"shard={cfg.shard} is set: each array task sets its own shard")
    if args.slurm.nodes != 1:
        raise ConfigError(f"nodes={args.slurm.nodes}: a generation shard runs on one node")
    steps = [s for s in cfg.steps if s != "merge"]
    if not steps:
        raise ConfigError(f"steps={cfg.steps}: no step to shard (only merge)")
    if not cfg.data.path:
        raise ConfigError("data.path is empty: give the prompts or data of the first step")
    check_path("data.path", cfg.data.path, hub_ok=True)
    if any(s in steps for s in ("sample", "ref_logps")) and cfg.model.name_or_path != "tiny":
        check_path("model.name_or_path", cfg.model.name_or_path, hub_ok=True)
    if "reward" in steps and cfg.reward.fn == "model":
        check_path("reward.model", cfg.reward.model, hub_ok=True)
    return cfg, steps


def submit(args: LaunchArgs) -> list:
    cfg_slurm = args.slurm
    cfg, steps = plan(args)
    check_cluster(cfg_slurm)
    n = cfg.num_shards
    out = Path(cfg.out)
    folder = out.resolve() / "slurm"
    yaml_path = folder / "generate.yaml"
    name = cfg_slurm.job_name or f"qrpo-gen-{out.name}"
    cwd = os.getcwd()
    grace = max(cfg_slurm.signal_delay_s - 15, 5)
    env = dict(cfg_slurm.env)
    base = ["--config", str(yaml_path)]
    shards = [
        GenerateJob(
            ["-m", "qrpo.generate.pipeline", *base, f"shard={i}", override("steps", steps)],
            str(out),
            cwd,
            env,
            grace,
        )
        for i in range(n)
    ]
    merge = GenerateJob(["-m", "qrpo.generate.merge", *base], str(out), cwd, env, grace)
    print(
        f"plan: {n} shard(s) of steps {steps} ({cfg_slurm.gpus_per_node} GPU(s) each), then a "
        f"merge; cluster={cfg_slurm.cluster}, time={cfg_slurm.time}, output in {out}"
    )
    print("  shard i runs: python " + " ".join(shards[0].args).replace("shard=0", "shard=<i>"))
    print("  then:         python " + " ".join(merge.args))
    merge_slurm = dataclasses.replace(cfg_slurm, gpus_per_node=0, processes_per_node=0)
    if cfg_slurm.dry_run:
        if cfg_slurm.cluster == "slurm":
            print("\n--- sbatch script of the shards ---")
            print(sbatch_script(cfg_slurm, folder, name, array=n if n > 1 else 0))
        print("dry run: nothing submitted")
        return []

    save_config(cfg, folder, "generate.yaml")
    save_config(cfg_slurm, folder, "launch.yaml")
    executor = make_executor(cfg_slurm, folder, name)
    if n == 1:
        shard_jobs = [executor.submit(shards[0])]
    else:
        with executor.batch():
            delayed = [executor.submit(job) for job in shards]
        shard_jobs = list(delayed)
    array_id = shard_jobs[0].job_id.split("_")[0]
    print(f"submitted shards: job {array_id} ({n} task(s)); logs in {folder}")
    if cfg_slurm.cluster == "slurm":
        merge_ex = make_executor(merge_slurm, folder, f"{name}-merge")
        merge_ex.update_parameters(dependency=f"afterok:{array_id}")
        merge_job = merge_ex.submit(merge)
        print(f"submitted merge: job {merge_job.job_id} (after every shard succeeds)")
        print(f"  watch: squeue -j {array_id},{merge_job.job_id}")
        if not cfg_slurm.wait:
            return [*shard_jobs, merge_job]
        results = wait(shard_jobs)
        results.append(wait([merge_job])[0])
    else:  # no dependencies here: wait for the shards, then merge
        results = wait(shard_jobs)
        merge_job = make_executor(merge_slurm, folder, f"{name}-merge").submit(merge)
        print(f"submitted merge: job {merge_job.job_id}")
        results.append(wait([merge_job])[0])
    print(f"done: {results[-1][0]}")
    return [*shard_jobs, merge_job]


def main(argv: list[str] | None = None) -> None:
    from qrpo.generate.config import PipelineConfig

    args = parse_launch_args(
        argv,
        prog="python -m qrpo.slurm.generate",
        description="Submit the generation pipeline as a job array over shards, then a merge. "
        "Each shard gets one GPU unless gpus_per_node says otherwise.",
        task_help=[
            "[pipeline]  as for python -m qrpo.generate.pipeline",
            *config_help(PipelineConfig),
        ],
        sweep=False,
        defaults=["gpus_per_node=1"],
    )
    try:
        submit(args)
    except ConfigError as err:
        print(f"python -m qrpo.slurm.generate: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
