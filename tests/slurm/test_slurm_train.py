"""`python -m qrpo.slurm.train` end to end: two SLURM nodes against one process, a preempted job that
checkpoints, requeues and resumes to the uninterrupted result (on SLURM, and through the local
executor, where the signal reaches the job's task alone and must be forwarded), and bad configs
that fail before anything is submitted."""

import json
import random
import re
import signal
from pathlib import Path

import psutil
import pytest
import torch
from slurm_helpers import (
    CPU,
    cli,
    job_id,
    losses,
    squeue,
    wait_for_checkpoint,
    wait_for_file,
    wait_gone,
    weights,
)

from qrpo.common.tiny import TASK

STEPS = 80  # the preemption runs: long enough to be signalled mid-way


@pytest.fixture(scope="module")
def train_yaml(tmp_path_factory) -> Path:
    """QRPO on 24 task prompts x 4 graded answers, reference model on the fly."""
    d = tmp_path_factory.mktemp("slurm-train")
    rng = random.Random(0)
    rows = []
    for prompt in TASK.prompts("train", 24):
        texts = [TASK.demonstration(prompt, rng, noise=0.7) for _ in range(4)]
        rows.append(
            {
                "prompt": prompt,
                "responses": [{"text": t, "reward": TASK.reward(prompt, t)} for t in texts],
            }
        )
    data = d / "grouped.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = d / "qrpo.yaml"
    path.write_text(
        f"""model: {{name_or_path: tiny}}
data: {{path: {data}, max_length: 48}}
loss: {{algorithm: qrpo, beta: 0.3, estimator: inclusive}}
ref: {{source: model}}
optim: {{lr: 1.0e-3, scheduler: constant, warmup_ratio: 0.0}}
run:
  global_batch: 16
  micro_batch_tokens: 256
  trackers: []
  plot: false
  peak_tflops: 1.0
"""
    )
    return path


def _long(run_dir: Path) -> list[str]:
    return [f"run.run_dir={run_dir}", f"run.max_steps={STEPS}", "run.epochs=20", "run.save_every=5"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, train_yaml) -> Path:
    """The long run, two processes (gloo) on this machine through the local executor."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    cli(
        "qrpo.slurm.train",
        "--config",
        str(train_yaml),
        *CPU,
        "cluster=local",
        "processes_per_node=2",
        "wait=true",
        *_long(run_dir),
    )
    assert len(losses(run_dir)) == STEPS
    return run_dir


def _same_run(run_dir: Path, reference: Path) -> None:
    # Resuming is exact on CPU: the same losses at every step and the same final weights.
    assert losses(run_dir) == losses(reference)
    a, b = weights(run_dir), weights(reference)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def _stopped_at(log: str) -> int:
    """The step of the preemption checkpoint, from the training log; it must be mid-run."""
    m = re.search(r"preempted: checkpoint at step (\d+) saved", log)
    assert m, log[-3000:]
    step = int(m.group(1))
    assert 0 < step < STEPS
    assert re.search(rf"resumed from \S+ at step {step}\n", log), log[-3000:]
    return step


# --------------------------------------------------------------------------- SLURM


def test_two_nodes_match_one_process(slurm_cluster, train_yaml, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    short = ["run.max_steps=4", "run.save_every=0"]
    out = cli(
        "qrpo.slurm.train",
        "--config",
        str(train_yaml),
        *CPU,
        "nodes=2",
        "partition=debug",
        f"run.run_dir={two}",
        *short,
    )
    job = job_id(out)
    assert f"logs:        {two / 'slurm' / f'{job}_0_log.out'}" in out.stdout
    # Meanwhile, the same run in one process through the local executor.
    cli("qrpo.slurm.train", "--config", str(train_yaml), *CPU, "cluster=local", "wait=true",
        f"run.run_dir={one}", *short)  # fmt: skip
    wait_gone(job)
    import submitit

    results = submitit.SlurmJob(two / "slurm", job, tasks=(0, 1)).results()
    assert [r["final"] for r in results] == [str(two / "final")] * 2
    node_logs = [(two / "slurm" / f"{job}_{t}_log.out").read_text() for t in (0, 1)]
    assert "--machine_rank 0" in node_logs[0] and "--machine_rank 1" in node_logs[1]
    assert "--main_process_ip 127.0.0.1" in node_logs[1]  # n1's NodeAddr, from scontrol
    assert "2 process(es)" in node_logs[0]
    assert (two / "slurm" / "train.yaml").is_file() and (two / "config.yaml").is_file()

    torch.testing.assert_close(
        torch.tensor(losses(two)), torch.tensor(losses(one)), rtol=1e-5, atol=1e-6
    )
    from safetensors.torch import load_file

    from qrpo.common.tiny import ensure_tiny

    start = load_file(ensure_tiny() / "model.safetensors")
    a, b = weights(one), weights(two)
    assert a.keys() == b.keys()
    # As tests/train/test_train.py::test_two_processes_match_one: Adam turns reordering noise
    # of near-zero gradients into updates of up to ~lr, hence 1e-4 on weights that moved more.
    assert max((a[k] - start[k]).abs().max().item() for k in a) > 2e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)


def test_preempted_job_requeues_and_resumes(slurm_cluster, train_yaml, uninterrupted, tmp_path):
    run_dir = tmp_path / "preempted"
    out = cli(
        "qrpo.slurm.train",
        "--config",
        str(train_yaml),
        *CPU,
        "nodes=2",
        "partition=debug",
        *_long(run_dir),
    )
    job = job_id(out)
    wait_for_checkpoint(run_dir)
    slurm_cluster.run("scancel", "--signal=USR2", job)
    wait_gone(job, release=True)  # requeued, released from its BeginTime hold, finished

    log0 = (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    log1 = (run_dir / "slurm" / f"{job}_1_log.out").read_text()
    _stopped_at(log0)
    assert "Requeued job" in log0 and "restarts=1" in log0 and "restarts=1" in log1
    # Only rank 0 checkpoints and requeues; the other node forwards and waits.
    assert "Not checkpointing nor requeuing" in log1
    assert log0.count("[slurm] SIGUSR2: forwarding") == log1.count("[slurm] SIGUSR2: forwarding")
    _same_run(run_dir, uninterrupted)
    assert not squeue(job)


def test_sweep_is_one_array_with_a_run_dir_each(slurm_cluster, train_yaml, tmp_path):
    base = tmp_path / "sweep"
    out = cli(
        "qrpo.slurm.train",
        "--config",
        str(train_yaml),
        *CPU,
        "partition=debug",
        f"run.run_dir={base}",
        "run.max_steps=2",
        "sweep.loss.beta=[0.1,0.3]",
    )
    submitted = re.findall(r"submitted job (\d+)_(\d+) \[(\d+)\]: (\S+)", out.stdout)
    array = submitted[0][0]
    assert submitted == [
        (array, "0", "0", str(base / "beta0.1")),
        (array, "1", "1", str(base / "beta0.3")),
    ]
    wait_gone(array)
    import submitit
    import yaml

    for i, beta in enumerate([0.1, 0.3]):
        run_dir = base / f"beta{beta}"
        result = submitit.SlurmJob(base / "slurm", f"{array}_{i}").result()
        assert result["final"] == str(run_dir / "final")
        assert yaml.safe_load((run_dir / "config.yaml").read_text())["loss"]["beta"] == beta
        assert len(losses(run_dir)) == 2


# --------------------------------------------------------------------------- local executor


def test_local_job_forwards_the_signal_and_resumes(train_yaml, uninterrupted, tmp_path):
    """LocalExecutor signals the job's task alone (not its children): only forwarding reaches
    the training processes. The requeue restarts the task in place."""
    run_dir = tmp_path / "local"
    out = cli(
        "qrpo.slurm.train",
        "--config",
        str(train_yaml),
        *CPU,
        "cluster=local",
        "processes_per_node=2",
        *_long(run_dir),
    )
    job = job_id(out)
    controller = psutil.Process(int(job))
    wait_for_checkpoint(run_dir)
    (task,) = [
        p for p in controller.children(recursive=True) if "submitit.core._submit" in p.cmdline()
    ]
    task.send_signal(signal.SIGUSR2)
    wait_for_file(run_dir / "slurm" / f"{job}_0_result.pkl")
    log = (run_dir / "slurm" / f"{job}_0_log.out").read_text()
    _stopped_at(log)
    assert "[slurm] SIGUSR2: forwarding to the command" in log and "Requeued job" in log
    _same_run(run_dir, uninterrupted)


# --------------------------------------------------------------------------- bad configs


def test_bad_configs_fail_before_submission(slurm_cluster, train_yaml, tmp_path):
    before = slurm_cluster.run("squeue", "-h", "-o", "%A").stdout
    run_dir = tmp_path / "never"
    cases = [
        (["partition=nope"], "partition='nope' does not exist on this cluster; partitions: debug"),
        (["nodes=3"], "nodes=3 but partition 'debug' has 2 node(s)"),
        (["gpus_per_node=1"], "gpus_per_node=1 but partition 'debug' has no GPUs"),
        ([f"data.path={tmp_path / 'missing.jsonl'}"], "missing.jsonl: no such file or folder"),
        (["loss.beta=-1"], "config key 'loss.beta': must be > 0"),
        (["run.preempt_signals=[]"], "lacks SIGUSR2"),
    ]
    for args, message in cases:
        out = cli(
            "qrpo.slurm.train", "--config", str(train_yaml), *CPU, f"run.run_dir={run_dir}", *args,
            check=False,
        )  # fmt: skip
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    out = cli("qrpo.slurm.train", "--config", str(tmp_path / "none.yaml"), *CPU, check=False)
    assert out.returncode == 2 and "training/task config not found" in out.stderr
    assert slurm_cluster.run("squeue", "-h", "-o", "%A").stdout == before
    assert not run_dir.exists()
