"""Training runs on the tiny model, shared by the loop's tests: data rows of the tiny task, and a
config of a few fast steps."""

import json
import random
from pathlib import Path

from qrpo.common.config import build_config
from qrpo.common.tiny import TASK
from qrpo.train.config import TrainConfig


def grouped_rows(n_prompts: int, k: int, seed: int = 0) -> list[dict]:
    """Prompts of the task with k noisy answers each, scored by the task's graded reward."""
    rng = random.Random(seed)
    rows = []
    for prompt in TASK.prompts("train", n_prompts):
        texts = [TASK.demonstration(prompt, rng, noise=0.7) for _ in range(k)]
        rows.append(
            {
                "prompt": prompt,
                "responses": [{"text": t, "reward": TASK.reward(prompt, t)} for t in texts],
            }
        )
    return rows


def pair_rows(n_prompts: int, seed: int = 0) -> list[dict]:
    rows = []
    for row in grouped_rows(n_prompts, 6, seed):
        resp = sorted(row["responses"], key=lambda r: r["reward"])
        if resp[-1]["reward"] > resp[0]["reward"]:
            rows.append(
                {
                    "prompt": row["prompt"],
                    "chosen": resp[-1]["text"],
                    "rejected": resp[0]["text"],
                    "score_chosen": resp[-1]["reward"],
                    "score_rejected": resp[0]["reward"],
                }
            )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def train_config(tmp_path: Path, data: str, algorithm: str, *overrides: str) -> TrainConfig:
    return build_config(
        TrainConfig,
        None,
        [
            f"data.path={data}",
            "data.max_length=48",
            f"loss.algorithm={algorithm}",
            f"run.run_dir={tmp_path / 'run'}",
            "run.trackers=[]",
            "run.plot=false",
            "run.global_batch=16",
            "run.micro_batch_tokens=256",
            "run.peak_tflops=1.0",
            "optim.warmup_ratio=0.0",
            "optim.scheduler=constant",
            *overrides,
        ],
    )


def logged_losses(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()
    ]
