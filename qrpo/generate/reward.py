"""Step 2, `python -m qrpo.generate.reward`: score every completion, fill each prompt's ref_rewards.

    python -m qrpo.generate.reward out=runs/gen reward.fn=task                 # the embedded task
    python -m qrpo.generate.reward out=runs/gen reward.fn=model reward.model=RM reward.max_length=2048
    python -m qrpo.generate.reward out=runs/gen reward.fn=code reward.sandbox.cpu_seconds=1
    python -m qrpo.generate.reward out=runs/gen reward.fn=mypkg.rewards:unit_tests

Rewards come from qrpo.common.rewards, the registry that evaluate scores with too: a reward function
gets a chunk of prompt rows (the prompt as the data gave it, text or chat messages, and the input
row's other columns: a code problem's unit tests, an entry point, ...) and their completions.
`reward.fn=model` scores with a sequence-classification reward model through its own tokenizer
and chat template (qrpo.common.reward_model), `reward.fn=code` runs a problem's asserts in the
sandbox (the paper's code reward is the fraction of unit tests passed).

The reference rewards of a prompt are the rewards of its reference samples in `ref_index`
order. A NaN, infinite or missing reward stops the step with a DataError naming the source row,
the completion and the reward function: a silent NaN would poison every quantile of its prompt.
"""

from __future__ import annotations

import math
import sys

from qrpo.common.data import DataError
from qrpo.common.rewards import RewardConfig, compute_rewards, load_reward
from qrpo.generate.records import info_of, prompt_of
from qrpo.generate.runner import cli, exit_on_error, run_shard_step


def _checked(value, source: str, row: dict, j: int, fn: str) -> float:
    c = row["completions"][j]
    where = f"completion '{c['completion_id']}' of prompt '{row['prompt_id']}'"
    if value is None:
        raise DataError(
            source, row["source_row"], f"completions[{j}].reward", f"reward {fn} gave none: {where}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(
            source,
            row["source_row"],
            f"completions[{j}].reward",
            f"reward {fn} gave {value!r}, not a number: {where}",
        )
    if not math.isfinite(value):
        raise DataError(
            source,
            row["source_row"],
            f"completions[{j}].reward",
            f"reward {fn} gave a non-finite value {value}: {where}",
        )
    return float(value)


def reference_rewards(row: dict, source: str) -> list[float]:
    """Rewards of the reference samples in ref_index order; samples the data no longer holds
    keep the reward the data gave for them."""
    refs = {c["ref_index"]: c["reward"] for c in row["completions"] if c["ref_index"] >= 0}
    old = list(row["ref_rewards"])
    size = max([len(old), *[k + 1 for k in refs]])
    out = []
    for k in range(size):
        value = refs.get(k, old[k] if k < len(old) else None)
        if value is None:
            raise DataError(
                source, row["source_row"], "ref_rewards", f"no reward for reference sample {k}"
            )
        out.append(value)
    return out


def reward_row(row: dict) -> dict:
    """A group as the reward functions see it: the prompt as the data gave it (chat messages or
    text) and the input row's other columns."""
    return {**info_of(row), "prompt": prompt_of(row)}


def score_rows(rows: list[dict], cfg: RewardConfig, source: str, fn: str) -> tuple[list[dict], int]:
    """Rows with every completion scored (with `cfg.keep_existing`, only the unscored ones) and
    ref_rewards filled; and the tokens the reward read."""
    todo = [
        [
            j
            for j, c in enumerate(row["completions"])
            if not (cfg.keep_existing and c["reward"] is not None)
        ]
        for row in rows
    ]
    scores = compute_rewards(
        cfg,
        [reward_row(row) for row in rows],
        [[row["completions"][j]["text"] for j in js] for row, js in zip(rows, todo)],
    )
    out = [{**row, "completions": [dict(c) for c in row["completions"]]} for row in rows]
    for row, js, values in zip(out, todo, scores.rewards):
        for j, value in zip(js, values):
            row["completions"][j]["reward"] = _checked(value, source, row, j, fn)
    for row in out:
        for j, c in enumerate(row["completions"]):
            _checked(c["reward"], source, row, j, fn)  # kept rewards are checked too
        row["ref_rewards"] = reference_rewards(row, source)
    return out, scores.tokens


def make_worker(cfg, source: str):
    """The reward, loaded once (a reward model, the sandbox), and the worker for one chunk."""
    rc = cfg.reward
    load_reward(rc)
    name = f"model {rc.model}" if rc.fn == "model" else rc.fn

    def work(rows: list[dict]) -> tuple[list[dict], int]:
        return score_rows(rows, rc, source, name)

    return work


def main(argv: list[str] | None = None) -> None:
    cli("reward", argv, __doc__, lambda cfg: run_shard_step(cfg, "reward", make_worker))


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
