r"""`python -m generate step=task|sample ...`: the task's data files, or a quick scored sample.

    python -m generate step=task out=runs/demo/data
    python -m generate step=sample model.name_or_path=runs/demo/sft/final \
        prompts=runs/demo/data/train_prompts.jsonl n=8 out=runs/demo/data/ref_samples.jsonl

`step=sample` is the one-process shortcut of the pipeline (sample, then the task's reward, in a
fresh work folder next to `out`) and writes the grouped format (prompt, responses with text and
reward, ref_rewards when an empty sample was left out), which `python -m train` reads directly.

The sharded, resumable pipeline has one module per step, all taking the same config keys:

    python -m generate.pipeline   sample -> reward -> build -> ref_logps -> merge, for one shard
    python -m generate.sample     n completions per prompt from the reference model
    python -m generate.reward     rewards (a reward function, or a reward model) and ref_rewards
    python -m generate.build      training rows: pointwise | best_worst | random_pairs | offline
    python -m generate.ref_logps  reference log-probs with the training loop's kernel
    python -m generate.merge      one checked file from a step's shards

Each prints its keys with `--help`; generate/pipeline.py's docstring has the full commands.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, doc, parse_config, sub
from common.data import DataConfig, write_jsonl
from common.model import ModelConfig
from common.tiny import write_task_data


@dataclass
class GenerateConfig:
    step: str = doc("task", "task (write the embedded task's data files) | sample")
    out: str = doc("runs/data", "output folder (task) or JSONL file (sample)")
    model: ModelConfig = sub(ModelConfig, "the reference model that samples")
    prompts: str = doc("", "sample: prompts file ({'prompt': ...} rows, or any data format)")
    n: int = doc(8, "sample: completions per prompt")
    temperature: float = doc(1.0, "sample: sampling temperature (0: greedy)")
    top_p: float = doc(1.0, "sample: nucleus sampling")
    max_new_tokens: int = doc(24, "sample: longest completion")
    seed: int = doc(0, "sample: base seed (each prompt id and sample draws its own stream)")
    batch_size: int = doc(64, "sample: sequences per generate() call")
    n_sft: int = doc(2000, "task: SFT demonstrations")
    n_train: int = doc(256, "task: training prompts")
    n_eval: int = doc(64, "task: held-out prompts")

    def __post_init__(self):
        if self.step not in ("task", "sample"):
            raise ConfigError(
                f"step must be task | sample, got '{self.step}' (the pipeline's steps are "
                "modules: python -m generate.pipeline, generate.sample, generate.reward, ...)"
            )
        if self.step == "sample" and not self.prompts:
            raise ConfigError("step=sample needs prompts=FILE.jsonl")


def sample_and_score(cfg: GenerateConfig, log=print) -> Path:
    """Sample and score with the task's reward through the pipeline, then write grouped JSONL.

    The work folder (`out` without its suffix, plus `.parts`) is started afresh each time: the
    same model path may hold another checkpoint than in an earlier call.
    """
    from generate.config import PipelineConfig, SampleConfig
    from generate.pipeline import run_pipeline
    from generate.shards import collect

    out = Path(cfg.out)
    work = out.with_name(out.stem + ".parts")
    shutil.rmtree(work, ignore_errors=True)
    pipeline = PipelineConfig(
        data=DataConfig(path=cfg.prompts),
        out=str(work),
        steps=["sample", "reward"],
        shard=0,
        num_shards=1,
        chunk_size=256,
        model=cfg.model,
        sample=SampleConfig(
            n=cfg.n,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
            batch_size=cfg.batch_size,
        ),
    )
    run_pipeline(pipeline, log)
    rows = []
    for group in collect(work / "reward").rows:
        samples = sorted(
            (c for c in group["completions"] if c["ref_index"] >= 0), key=lambda c: c["ref_index"]
        )
        # Empty samples keep their reward among the reference rewards but cannot be trained on.
        responses = [
            {"text": c["text"], "reward": c["reward"]} for c in samples if c["text"].strip()
        ]
        if not responses:
            continue
        row = {"prompt": group["messages"] or group["prompt"], "responses": responses}
        if len(responses) < len(samples):
            row["ref_rewards"] = group["ref_rewards"]
        rows.append(row)
    return write_jsonl(rows, out)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        GenerateConfig,
        argv,
        prog="python -m generate",
        description=__doc__,
    )
    if cfg.step == "task":
        paths = write_task_data(
            cfg.out, n_sft=cfg.n_sft, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed
        )
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    else:
        print(f"wrote {sample_and_score(cfg)}")


if __name__ == "__main__":
    from generate.pipeline import exit_on_error

    exit_on_error(main, sys.argv[1:])
