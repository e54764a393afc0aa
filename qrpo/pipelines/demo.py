"""The main job on the embedded default: SFT a reference, sample and score it, train QRPO and DPO
from it, and compare all three on held-out prompts. About two minutes on two CPU cores.

    python -m qrpo.pipelines.demo                     # everything under runs/demo
    python -m qrpo.pipelines.demo out=runs/demo2 k=16 qrpo_beta=0.1
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from qrpo.common.config import build_config, doc, parse_config
from qrpo.train.config import TrainConfig
from qrpo.train.train import train


@dataclass
class DemoConfig:
    out: str = doc("runs/demo", "folder for data, runs and the comparison")
    k: int = doc(8, "reference samples per training prompt")
    n_sft: int = doc(2000, "SFT demonstrations")
    n_train: int = doc(256, "training prompts")
    n_eval: int = doc(64, "held-out prompts")
    sft_epochs: int = doc(6, "SFT epochs over the noisy demonstrations")
    qrpo_beta: float = doc(0.3, "QRPO beta", gt=0)
    dpo_beta: float = doc(0.1, "DPO beta", gt=0)
    epochs: int = doc(2, "QRPO and DPO epochs (same budget for both)")
    global_batch: int = doc(0, "QRPO and DPO sequences per step (0: their configs' values)")
    seed: int = doc(0, "seed")


def _step(title: str) -> float:
    print(f"\n=== {title}", flush=True)
    return time.perf_counter()


def run(cfg: DemoConfig) -> dict:
    from qrpo.common.tiny import write_task_data
    from qrpo.evaluate.__main__ import EvalConfig, evaluate
    from qrpo.generate.config import PipelineConfig
    from qrpo.generate.pipeline import run_pipeline

    out = Path(cfg.out)
    data = out / "data"
    t = _step(f"1/6 task data and the tiny model -> {data}")
    files = write_task_data(
        data, n_sft=cfg.n_sft, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed
    )

    _step("2/6 SFT of the tiny model on noisy demonstrations: the reference")
    sft = build_config(
        TrainConfig,
        "configs/train/sft_tiny.yaml",
        [
            f"data.path={files['sft']}",
            f"run.run_dir={out / 'sft'}",
            f"run.epochs={cfg.sft_epochs}",
            f"run.seed={cfg.seed}",
        ],
    )
    ref_dir = train(sft)["final"]

    _step(
        f"3/6 reference data: {cfg.k} samples per training prompt, task rewards, training rows, "
        "reference log-probs (generate pipeline)"
    )
    gen = out / "generate"
    common = [f"model.name_or_path={ref_dir}", "chunk_size=64"]
    # The same sampled-and-scored data: the second call only merges its reward step (the input
    # of the pairs below), so it must name the same settings as the first.
    sampled = [
        f"data.path={files['train_prompts']}",
        f"out={gen / 'pointwise'}",
        f"sample.n={cfg.k}",
        "sample.max_new_tokens=24",
        f"sample.seed={cfg.seed}",
        "reward.fn=task",
        *common,
    ]
    run_pipeline(
        build_config(
            PipelineConfig,
            None,
            [*sampled, "build.regime=pointwise", "steps=[sample,reward,build,ref_logps,merge]"],
        )
    )
    run_pipeline(
        build_config(PipelineConfig, None, [*sampled, "steps=[merge]", "merge.step=reward"])
    )
    run_pipeline(
        build_config(
            PipelineConfig,
            None,
            [
                f"data.path={gen / 'pointwise' / 'reward.parquet'}",
                f"out={gen / 'pairs'}",
                "build.regime=best_worst",
                "steps=[build,ref_logps,merge]",
                *common,
            ],
        )
    )

    batch = [f"run.global_batch={cfg.global_batch}"] if cfg.global_batch else []
    _step("4/6 QRPO on every reference sample (pointwise; quantile among the prompt's others)")
    qrpo = build_config(
        TrainConfig,
        "configs/train/qrpo_tiny.yaml",
        [
            f"model.name_or_path={ref_dir}",
            f"data.path={gen / 'pointwise' / 'ref_logps.parquet'}",
            f"run.run_dir={out / 'qrpo'}",
            f"loss.beta={cfg.qrpo_beta}",
            f"run.epochs={cfg.epochs}",
            "ref.source=data",
            f"run.seed={cfg.seed}",
            *batch,
        ],
    )
    qrpo_dir = train(qrpo)["final"]

    _step("5/6 DPO on best/worst pairs of the same samples, same epochs")
    dpo = build_config(
        TrainConfig,
        "configs/train/dpo_tiny.yaml",
        [
            f"model.name_or_path={ref_dir}",
            f"data.path={gen / 'pairs' / 'ref_logps.parquet'}",
            f"run.run_dir={out / 'dpo'}",
            f"loss.beta={cfg.dpo_beta}",
            f"run.epochs={cfg.epochs}",
            "ref.source=data",
            f"run.seed={cfg.seed}",
            *batch,
        ],
    )
    dpo_dir = train(dpo)["final"]

    _step("6/6 held-out comparison against the reference")
    results = evaluate(
        EvalConfig(
            models=[ref_dir, qrpo_dir, dpo_dir],
            prompts=str(files["eval_prompts"]),
            out=str(out / "eval.json"),
        )
    )
    print(
        f"\ndemo done in {time.perf_counter() - t:.0f} s. Outputs: {out}/eval.md (table), "
        f"{out}/eval.json, {out}/*.png (plots), {out}/*/training_curves.png, "
        f"{out}/*/final (models)"
    )
    return results


def main(argv: list[str] | None = None) -> None:
    run(
        parse_config(
            DemoConfig,
            argv,
            prog="python -m qrpo.pipelines.demo",
            description="SFT -> sample -> QRPO and DPO -> compare, on the tiny task.",
        )
    )


if __name__ == "__main__":
    main()
