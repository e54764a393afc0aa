"""`python -m evaluate models=[REF_DIR,RUN_DIR/final] prompts=FILE`: task reward and win rate.

Samples completions for held-out prompts from each model (same seeds for every model), scores
them with the embedded task's graded reward, and reports the mean reward, mean length and the
per-prompt win rate of each model against the first one, as a table and a JSON file.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, doc, parse_config
from common.model import ModelConfig, load_model, load_tokenizer
from common.tiny import TASK


@dataclass
class EvalConfig:
    models: list = doc([], "model folders; the first is the baseline (usually the reference)")
    prompts: str = doc("", "JSONL of {'prompt': ...} held-out rows")
    n: int = doc(4, "samples per prompt and model")
    temperature: float = doc(1.0, "sampling temperature (0: greedy)")
    max_new_tokens: int = doc(24, "longest completion")
    seed: int = doc(1234, "base sampling seed, shared by all models")
    out: str = doc("", "JSON file for the results (default: next to the last model)")

    def __post_init__(self):
        if not self.models:
            raise ConfigError("models must list at least one model folder")
        if not self.prompts:
            raise ConfigError("prompts must name a JSONL file of prompts")


def evaluate(cfg: EvalConfig) -> dict:
    from generate.sample import sample_completions

    prompts = [
        json.loads(line)["prompt"] for line in Path(cfg.prompts).read_text().splitlines() if line
    ]
    per_model = {}
    for path in cfg.models:
        mcfg = ModelConfig(name_or_path=path)
        samples = sample_completions(
            load_model(mcfg, log=lambda *_: None),
            load_tokenizer(mcfg),
            prompts,
            n=cfg.n,
            temperature=cfg.temperature,
            max_new_tokens=cfg.max_new_tokens,
            seed=cfg.seed,
        )
        per_model[path] = {
            "prompt_rewards": [
                sum(TASK.reward(p, t) for t in ts) / len(ts) for p, ts in zip(prompts, samples)
            ],
            "mean_length": sum(len(t.split()) for ts in samples for t in ts)
            / (len(prompts) * cfg.n),
        }
    base = per_model[cfg.models[0]]["prompt_rewards"]
    results = {}
    for path, r in per_model.items():
        wins = sum((a > b) + 0.5 * (a == b) for a, b in zip(r["prompt_rewards"], base))
        results[path] = {
            "mean_reward": sum(r["prompt_rewards"]) / len(prompts),
            "win_rate_vs_first": wins / len(prompts),
            "mean_length": r["mean_length"],
        }
    print(f"{'model':<48} {'reward':>8} {'win rate':>9} {'length':>7}")
    for path, r in results.items():
        print(
            f"{path:<48} {r['mean_reward']:>8.3f} {r['win_rate_vs_first']:>9.3f} {r['mean_length']:>7.2f}"
        )
    out = Path(cfg.out or Path(cfg.models[-1]).parent / "eval.json")
    out.write_text(json.dumps(results, indent=2))
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        EvalConfig,
        argv,
        prog="python -m evaluate",
        description="Compare models on held-out prompts of the task.",
    )
    evaluate(cfg)


if __name__ == "__main__":
    try:
        main()
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
