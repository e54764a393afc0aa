"""`python -m generate step=task|sample ...`: build the task data or sample scored completions.

    python -m generate step=task out=runs/demo/data
    python -m generate step=sample model.name_or_path=runs/demo/sft/final \
        prompts=runs/demo/data/train_prompts.jsonl n=8 out=runs/demo/data/ref_samples.jsonl

`sample` writes the grouped format (prompt, responses with text and reward, ref_rewards), which
`python -m train` reads directly.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, doc, parse_config, sub
from common.data import write_jsonl
from common.model import ModelConfig, load_model, load_tokenizer
from common.tiny import TASK, write_task_data


@dataclass
class GenerateConfig:
    step: str = doc("task", "task (write the embedded task's data files) | sample")
    out: str = doc("runs/data", "output folder (task) or JSONL file (sample)")
    model: ModelConfig = sub(ModelConfig, "the reference model that samples")
    prompts: str = doc("", "JSONL of {'prompt': ...} rows to sample for")
    n: int = doc(8, "completions per prompt")
    temperature: float = doc(1.0, "sampling temperature (0: greedy)")
    top_p: float = doc(1.0, "nucleus sampling")
    max_new_tokens: int = doc(24, "longest completion")
    seed: int = doc(0, "base seed; prompt i uses its own seed derived from it")
    n_sft: int = doc(2000, "task: SFT demonstrations")
    n_train: int = doc(256, "task: training prompts")
    n_eval: int = doc(64, "task: held-out prompts")

    def __post_init__(self):
        if self.step not in ("task", "sample"):
            raise ConfigError(f"step must be task | sample, got '{self.step}'")
        if self.step == "sample" and not self.prompts:
            raise ConfigError("step=sample needs prompts=FILE.jsonl")


def sample_and_score(cfg: GenerateConfig) -> Path:
    from generate.sample import sample_completions

    prompts = [
        json.loads(line)["prompt"] for line in Path(cfg.prompts).read_text().splitlines() if line
    ]
    tokenizer = load_tokenizer(cfg.model)
    model = load_model(cfg.model)
    samples = sample_completions(
        model,
        tokenizer,
        prompts,
        n=cfg.n,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
    )
    rows = []
    for prompt, texts in zip(prompts, samples):
        rewards = [TASK.reward(prompt, t) for t in texts]
        # Empty samples keep their reward among the reference rewards but cannot be trained on.
        responses = [{"text": t, "reward": r} for t, r in zip(texts, rewards) if t]
        if not responses:
            continue
        row = {"prompt": prompt, "responses": responses}
        if len(responses) < len(texts):  # some were empty: list the reference rewards in full
            row["ref_rewards"] = rewards
        rows.append(row)
    return write_jsonl(rows, cfg.out)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        GenerateConfig,
        argv,
        prog="python -m generate",
        description="Build the embedded task's data, or sample scored completions.",
    )
    if cfg.step == "task":
        paths = write_task_data(
            cfg.out, n_sft=cfg.n_sft, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=cfg.seed
        )
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    else:
        print(f"wrote {sample_and_score(cfg)}")


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
