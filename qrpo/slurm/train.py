"""`python -m qrpo.slurm.train`: the training loop on N nodes through submitit, with requeue.

    python -m qrpo.slurm.train --config configs/train/qrpo_gpu.yaml nodes=4 gpus_per_node=8 \
        partition=gpu time=24:00:00 cpus_per_task=64 run.run_dir=runs/qrpo_8b
    python -m qrpo.slurm.train --config configs/train/qrpo_gpu.yaml nodes=2 \
        sweep.loss.beta=[3e-3,1e-2] sweep.optim.lr=[5e-7,1e-6] --dry-run     # a 2x2 grid
    python -m qrpo.slurm.train --config configs/train/qrpo_tiny.yaml cluster=local gpus_per_node=0

One task per node runs `accelerate launch` with the node's rank (SLURM_NODEID), the first node of
the allocation as rendezvous host and a port derived from the job id; on GPUs with the accelerate
config of the run (FSDP2 multi-node by default), on CPU-only nodes with `--multi_gpu` (gloo). A
single process in all runs `python -m qrpo.train` directly. The training config is resolved and
checked here, written to RUN_DIR/slurm/train.yaml, and every (re)start of the job runs exactly
`python -m qrpo.train --config RUN_DIR/slurm/train.yaml`, so a requeued job resumes from
RUN_DIR/checkpoints/. submitit's files and the per-node logs are in RUN_DIR/slurm/ (a sweep's in
BASE/slurm/, its runs in BASE/<point>/; on SLURM one job array, with cluster=local one
background job per point, all at once).

Preemption and time limits: see `qrpo/slurm/job.py`. SIGUSR2 (`signal_delay_s` before the time limit,
or `scancel --signal=USR2 JOBID`) -> the loop saves a checkpoint at the next step and exits 75 ->
the job is requeued -> the rerun resumes. Nothing since the last step is lost.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path

from qrpo.common.config import ConfigError, config_help, save_config, to_yaml
from qrpo.slurm.config import (
    LaunchArgs,
    SlurmConfig,
    check_accelerate_config,
    check_cluster,
    check_path,
    override,
    parse_launch_args,
    task_config,
)
from qrpo.slurm.job import (
    CommandJob,
    make_executor,
    node_address,
    preempt_signal,
    rendezvous_port,
    sbatch_script,
    wait,
)
from qrpo.slurm.sweep import grid_points


class TrainJob(CommandJob):
    """One training run: `python -m qrpo.train --config RUN_DIR/slurm/train.yaml` on every node."""

    def __init__(
        self,
        train_yaml: str,
        run_dir: str,
        cfg: SlurmConfig,
        accelerate_config: str,
        cwd: str,
    ):
        super().__init__(cwd=cwd, env=dict(cfg.env), grace_s=max(cfg.signal_delay_s - 15, 5))
        self.train_yaml = train_yaml
        self.run_dir = run_dir
        self.gpus_per_node = cfg.gpus_per_node
        self.per_node = cfg.per_node
        self.accelerate_config = accelerate_config
        self.port = cfg.port

    def command(self, env) -> list[str]:
        nodes = env.num_nodes
        host = "127.0.0.1" if nodes == 1 else node_address(env.hostnames[0])
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        port = self.port or rendezvous_port(env.raw_job_id, restarts)
        return self.launch_command(nodes, env.node, host, str(port))

    def launch_command(self, nodes: int, rank, host: str, port: str) -> list[str]:
        train = ["-m", "qrpo.train", "--config", self.train_yaml]
        world = nodes * self.per_node
        if world == 1:
            return [sys.executable, *train]
        launch = [
            *(sys.executable, "-m", "qrpo.slurm.launcher"),
            *("--num_machines", str(nodes), "--num_processes", str(world)),
            *("--machine_rank", str(rank), "--main_process_ip", host),
            *("--main_process_port", port),
        ]
        if self.gpus_per_node:
            launch += ["--config_file", self.accelerate_config]
        else:  # CPU-only: gloo, and no accelerate default config read from ~/.cache
            launch += ["--multi_gpu", "--mixed_precision", "no", "--dynamo_backend", "no"]
        return [*launch, *train]

    def describe(self) -> dict:
        run = Path(self.cwd, self.run_dir)
        return {
            "run_dir": str(run),
            "final": str(run / "final"),
            "metrics": str(run / "metrics.jsonl"),
        }


# --------------------------------------------------------------------------- planning


@dataclass
class Run:
    name: str
    cfg: object  # qrpo.train.config.TrainConfig


def plan_runs(args: LaunchArgs) -> tuple[str, list[Run]]:
    """The base run directory and every run of the grid (one without a sweep), each checked."""
    from qrpo.train.config import TrainConfig

    base = task_config(TrainConfig, args.config, args.overrides)
    points = grid_points(args.grid) or [("", [])]
    runs = []
    for name, extra in points:
        run_dir = str(Path(base.run.run_dir) / name) if name else base.run.run_dir
        cfg = task_config(
            TrainConfig, args.config, [*args.overrides, *extra, override("run.run_dir", run_dir)]
        )
        runs.append(Run(name, cfg))
    # grid_points names points apart; this is the last word, since two tasks in one run_dir
    # would race on its checkpoints (and the second would stop at the run_dir lock).
    seen: dict[str, str] = {}
    for run in runs:
        first = seen.setdefault(str(Path(run.cfg.run.run_dir).resolve()), run.name)
        if first != run.name:
            raise ConfigError(
                f"grid points {first} and {run.name} would share run_dir {run.cfg.run.run_dir}"
            )
    check_runs(runs, args.slurm)
    return base.run.run_dir, runs


def check_runs(runs: list[Run], slurm: SlurmConfig) -> None:
    """What the job would only find out on the nodes, found here."""
    from qrpo.train.losses import get_algorithm
    from qrpo.train.resume import check_fresh

    inputs = {
        (
            r.cfg.data.path,
            r.cfg.model.name_or_path,
            r.cfg.model.tokenizer,
            r.cfg.ref.name_or_path,
        ): r.cfg
        for r in runs
    }
    for cfg in inputs.values():  # once per distinct set of inputs
        if not cfg.data.path:
            raise ConfigError("data.path is empty: give the training data (data.path=FILE)")
        check_path("data.path", cfg.data.path, hub_ok=True)
        for field, path in [
            ("model.name_or_path", cfg.model.name_or_path),
            ("model.tokenizer", cfg.model.tokenizer),
            ("ref.name_or_path", cfg.ref.name_or_path),
        ]:
            if path != "tiny":
                check_path(field, path, hub_ok=True)
    sig = preempt_signal().name
    world = slurm.nodes * slurm.per_node
    for run in runs:
        if run.cfg.run.resume == "never":
            # Checked here, before RUN_DIR/slurm/ is written; the job itself resumes (auto), so
            # that a requeued job continues from its own checkpoints.
            check_fresh(run.cfg.run.run_dir)
            run.cfg.run.resume = "auto"
        if sig not in run.cfg.run.preempt_signals:
            raise ConfigError(
                f"run.preempt_signals={run.cfg.run.preempt_signals} lacks {sig}, the signal "
                "SLURM sends before the time limit: the run could not checkpoint on it"
            )
        spec = get_algorithm(run.cfg.loss.algorithm)
        per_step = run.cfg.run.global_batch // spec.sequences_per_example
        if per_step < world:
            raise ConfigError(
                f"run.global_batch={run.cfg.run.global_batch} gives {per_step} examples per "
                f"step, fewer than the {world} processes of {slurm.nodes} node(s)"
            )


def submit(args: LaunchArgs) -> list:
    """Check, print the plan, submit (unless dry_run); returns the submitit jobs."""
    base, runs = plan_runs(args)
    return submit_runs(args.slurm, base, runs)


def submit_runs(cfg: SlurmConfig, base: str, runs: list[Run]) -> list:
    """Submit checked runs (one job, or one array for several); `base` holds the array's
    submitit folder. Runs need not share a config: qrpo.pipelines.frontier submits every algorithm's
    grid as one array."""
    check_cluster(cfg)
    accelerate_config = check_accelerate_config(cfg)
    sweep = len(runs) > 1 or bool(runs[0].name)
    folder = Path(base if sweep else runs[0].cfg.run.run_dir).resolve() / "slurm"
    job_name = cfg.job_name or f"qrpo-{Path(base).name}"
    cwd = os.getcwd()

    where = f"cluster={cfg.cluster}" + (f", partition={cfg.partition}" if cfg.partition else "")
    print(
        f"plan: {len(runs)} run(s) x {cfg.nodes} node(s) x {cfg.per_node} process(es) "
        f"({'GPU' if cfg.gpus_per_node else 'CPU, gloo'}), {where}, time={cfg.time}"
    )
    jobs = []
    for i, run in enumerate(runs):
        run_dir = run.cfg.run.run_dir
        yaml_path = Path(run_dir, "slurm", "train.yaml").resolve()
        job = TrainJob(str(yaml_path), run_dir, cfg, accelerate_config, cwd)
        tag = f"[{i}] " if sweep else ""
        print(f"  {tag}{run_dir}" + (f"  ({run.name})" if run.name else ""))
        jobs.append(job)
        if not cfg.dry_run:
            save_config(run.cfg, yaml_path.parent, "train.yaml")
    preview = jobs[0].launch_command(cfg.nodes, "$SLURM_NODEID", "<first node>", "<port>")
    print("  each node runs: " + " ".join(preview))
    for run in runs:
        latest = Path(run.cfg.run.run_dir, "checkpoints", "latest")
        if latest.is_file():
            print(
                f"  note: {run.cfg.run.run_dir} has {latest.read_text().strip()}: it resumes there"
            )
    if cfg.cluster == "slurm" and cfg.gpus_per_node and not cfg.cpus_per_task:
        print(
            f"  note: cpus_per_task=0 keeps the cluster's default CPUs for all {cfg.per_node} "
            "processes of a node (often 1): set cpus_per_task (and mem_gb) for real runs"
        )
    if cfg.dry_run:
        if cfg.cluster == "slurm":
            print("\n--- sbatch script (submitit writes it on submission) ---")
            print(sbatch_script(cfg, folder, job_name, array=len(runs) if sweep else 0))
        if not sweep:
            print("--- training config ---\n" + to_yaml(runs[0].cfg))
        print("dry run: nothing submitted")
        return []

    save_config(cfg, folder, "launch.yaml")
    executor = make_executor(cfg, folder, job_name)
    if len(jobs) == 1:
        submitted = [executor.submit(jobs[0])]
    else:
        with executor.batch():
            delayed = [executor.submit(job) for job in jobs]
        submitted = list(delayed)
    for i, (job, run) in enumerate(zip(submitted, runs)):
        tag = f" [{i}]" if sweep else ""
        print(f"submitted job {job.job_id}{tag}: {run.cfg.run.run_dir}")
    log = submitted[0].paths.stdout
    print(f"  logs:        {log} (and .err; one pair per node task: _0_, _1_, ...)")
    print(f"  submitit:    {folder}")
    run_dir = "RUN_DIR" if sweep else runs[0].cfg.run.run_dir
    print(f"  metrics:     {run_dir}/metrics.jsonl, checkpoints in {run_dir}/checkpoints/")
    if cfg.cluster == "slurm":
        ids = " ".join(sorted({j.job_id.split("_")[0] for j in submitted}))
        print(f"  watch:       squeue -j {ids}    cancel: scancel {ids}")
        print(f"  preempt:     scancel --signal=USR2 {submitted[0].job_id} (checkpoint, requeue)")
    if cfg.wait or cfg.cluster == "debug":
        for job, result in zip(submitted, wait(submitted)):
            print(f"job {job.job_id} finished: {result[0]}")
    return submitted


def main(argv: list[str] | None = None) -> None:
    from qrpo.train.config import TrainConfig

    args = parse_launch_args(
        argv,
        prog="python -m qrpo.slurm.train",
        description="Submit a training run (or a grid of runs) to SLURM through submitit.",
        task_help=["[training]  as for python -m qrpo.train", *config_help(TrainConfig)],
    )
    try:
        submit(args)
    except ConfigError as err:
        print(f"python -m qrpo.slurm.train: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
