"""The loop under accelerate's FSDP2 config, for real: two gloo processes shard the tiny model
(fully_shard), give the losses of one process, and resume from a sharded checkpoint."""

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrpo.common.tiny import TASK

ROOT = Path(__file__).resolve().parents[2]
STEPS = 4


def _data(path: Path) -> str:
    rng = random.Random(0)
    rows = []
    for prompt in TASK.prompts("train", 24):
        texts = [TASK.demonstration(prompt, rng, noise=0.7) for _ in range(4)]
        responses = [{"text": t, "reward": TASK.reward(prompt, t)} for t in texts]
        rows.append({"prompt": prompt, "responses": responses})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _args(data: str, run_dir: Path) -> list[str]:
    return [
        "-m",
        "qrpo.train",
        f"data.path={data}",
        "data.max_length=48",
        "loss.algorithm=qrpo",
        "loss.beta=0.3",
        "optim.lr=3e-3",
        "optim.scheduler=constant",
        "optim.warmup_ratio=0.0",
        "run.global_batch=16",
        "run.micro_batch_tokens=256",
        f"run.max_steps={STEPS}",
        "run.save_every=2",
        "run.peak_tflops=1.0",
        "run.trackers=[]",
        "run.plot=false",
        f"run.run_dir={run_dir}",
    ]


def _run(cmd: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def _fsdp(data: str, run_dir: Path) -> subprocess.CompletedProcess:
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file"]
    config = str(ROOT / "configs" / "accelerate" / "fsdp2_cpu.yaml")
    return _run([*launch, config, "--main_process_port", "29547", *_args(data, run_dir)])


def _losses(run_dir: Path) -> list[float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


@pytest.mark.slow
def test_fsdp2_two_processes_match_one_and_resume_from_a_sharded_checkpoint(tmp_path):
    data = _data(tmp_path / "grouped.jsonl")
    one, two = tmp_path / "one", tmp_path / "fsdp"
    _run([sys.executable, *_args(data, one)])
    log = _fsdp(data, two).stdout
    assert "2 process(es) (FSDP)" in log
    torch.testing.assert_close(
        torch.tensor(_losses(two)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6
    )
    # The checkpoint is sharded: distributed-checkpoint files, no single model file.
    ckpt = two / "checkpoints" / "step_00000002"
    assert list(ckpt.rglob("*.distcp")) and not list(ckpt.glob("model*.safetensors"))

    # The gathered final model moved like the one-process model: the head kernel's gradient
    # reached the sharded (tied) embedding.
    from safetensors.torch import load_file

    from qrpo.common.tiny import ensure_tiny

    start = load_file(ensure_tiny() / "model.safetensors")
    a = load_file(one / "final" / "model.safetensors")
    b = load_file(two / "final" / "model.safetensors")
    embed = "model.embed_tokens.weight"
    assert (a[embed] - start[embed]).abs().max() > 1e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)

    # Resume from the sharded step-2 checkpoint as if the run had died after saving it.
    full = _losses(two)
    for path in (two / "checkpoints").glob("step_00000004*"):
        subprocess.run(["rm", "-rf", str(path)], check=True)
    (two / "checkpoints" / "latest").write_text("step_00000002")
    log = _fsdp(data, two).stdout
    assert "resumed from" in log and "at step 2" in log
    assert _losses(two) == full
