r"""`python -m qrpo.generate step=task out=DIR`: the embedded task's data files.

    python -m qrpo.generate step=task out=runs/demo/data     # sft.jsonl, train_prompts.jsonl, eval_prompts.jsonl

The sharded, resumable reference-data pipeline has one module per step, all taking the same
config keys:

    python -m qrpo.generate.pipeline   sample -> reward -> build -> ref_logps -> merge, for one shard
    python -m qrpo.generate.sample     n completions per prompt from the reference model
    python -m qrpo.generate.reward     rewards (a reward function, or a reward model) and ref_rewards
    python -m qrpo.generate.build      training rows: pointwise | best_worst | random_pairs | offline
    python -m qrpo.generate.ref_logps  reference log-probs with the training loop's kernel
    python -m qrpo.generate.merge      one checked file from a step's shards

Each prints its keys with `--help`; qrpo/generate/pipeline.py's docstring has the full commands.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from qrpo.common.config import ConfigError, doc, parse_config
from qrpo.common.tiny import write_task_data


@dataclass
class GenerateConfig:
    step: str = doc("task", "task: write the embedded task's data files")
    out: str = doc("runs/data", "output folder")
    seed: int = doc(0, "seed of the demonstrations' noise")
    n_sft: int = doc(2000, "SFT demonstrations")
    n_train: int = doc(256, "training prompts")
    n_eval: int = doc(64, "held-out prompts")

    def __post_init__(self):
        if self.step != "task":
            raise ConfigError(
                f"step must be 'task', got '{self.step}' (the pipeline's steps are modules: "
                "python -m qrpo.generate.pipeline, qrpo.generate.sample, qrpo.generate.reward, ...)"
            )


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(GenerateConfig, argv, prog="python -m qrpo.generate", description=__doc__)
    paths = write_task_data(
        cfg.out, n_sft=cfg.n_sft, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed
    )
    print("wrote " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    from qrpo.generate.runner import exit_on_error

    exit_on_error(main, sys.argv[1:])
