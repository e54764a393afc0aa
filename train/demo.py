"""The main job on the embedded default: SFT a reference, sample and score it, train QRPO and DPO
from it, and compare all three on held-out prompts. About two minutes on two CPU cores.

    python -m train.demo                     # everything under runs/demo
    python -m train.demo out=runs/demo2 k=16 qrpo_beta=0.1
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from common.config import build_config, doc, parse_config
from common.data import write_jsonl
from generate.__main__ import GenerateConfig, sample_and_score
from generate.build import best_worst_pairs
from train.config import TrainConfig
from train.train import train


@dataclass
class DemoConfig:
    out: str = doc("runs/demo", "folder for data, runs and the comparison")
    k: int = doc(8, "reference samples per training prompt")
    n_train: int = doc(256, "training prompts")
    n_eval: int = doc(64, "held-out prompts")
    sft_epochs: int = doc(6, "SFT epochs over the noisy demonstrations")
    qrpo_beta: float = doc(0.3, "QRPO beta")
    dpo_beta: float = doc(0.1, "DPO beta")
    epochs: int = doc(2, "QRPO and DPO epochs (same budget for both)")
    seed: int = doc(0, "seed")


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def run(cfg: DemoConfig) -> dict:
    from common.tiny import write_task_data
    from evaluate.__main__ import EvalConfig, evaluate

    out = Path(cfg.out)
    data = out / "data"
    t = _step(f"1/6 task data -> {data}")
    files = write_task_data(data, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed)

    _step("2/6 SFT of the tiny model on noisy demonstrations (the reference)")
    sft = build_config(
        TrainConfig,
        "configs/train/sft_tiny.yaml",
        [f"data.path={files['sft']}", f"run.run_dir={out / 'sft'}", f"run.epochs={cfg.sft_epochs}"],
    )
    ref_dir = train(sft)["final"]

    _step(f"3/6 sample {cfg.k} completions per training prompt from the reference and score them")
    samples = sample_and_score(
        GenerateConfig(
            step="sample",
            out=str(data / "ref_samples.jsonl"),
            prompts=str(files["train_prompts"]),
            n=cfg.k,
            seed=cfg.seed,
            model=sft.model.__class__(name_or_path=ref_dir),
        )
    )
    rows = [json.loads(line) for line in samples.read_text().splitlines()]
    pairs = write_jsonl(best_worst_pairs(rows), data / "ref_pairs.jsonl")

    _step("4/6 QRPO on every reference sample (pointwise, quantile among the prompt's samples)")
    qrpo = build_config(
        TrainConfig,
        "configs/train/qrpo_tiny.yaml",
        [
            f"model.name_or_path={ref_dir}",
            f"data.path={samples}",
            f"run.run_dir={out / 'qrpo'}",
            f"loss.beta={cfg.qrpo_beta}",
            f"run.epochs={cfg.epochs}",
        ],
    )
    qrpo_dir = train(qrpo)["final"]

    _step("5/6 DPO on best/worst pairs of the same samples")
    dpo = build_config(
        TrainConfig,
        "configs/train/dpo_tiny.yaml",
        [
            f"model.name_or_path={ref_dir}",
            f"data.path={pairs}",
            f"run.run_dir={out / 'dpo'}",
            f"loss.beta={cfg.dpo_beta}",
            f"run.epochs={cfg.epochs}",
        ],
    )
    dpo_dir = train(dpo)["final"]

    _step("6/6 held-out comparison (task reward, win rate against the reference)")
    results = evaluate(
        EvalConfig(
            models=[ref_dir, qrpo_dir, dpo_dir],
            prompts=str(files["eval_prompts"]),
            out=str(out / "eval.json"),
        )
    )
    print(
        f"\ndemo done in {time.perf_counter() - t:.0f} s; results in {out / 'eval.json'}, "
        f"training curves in {out}/*/training_curves.png"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    run(
        parse_config(
            DemoConfig,
            argv,
            prog="python -m train.demo",
            description="SFT -> sample -> QRPO and DPO -> compare, on the tiny task.",
        )
    )


if __name__ == "__main__":
    main()
