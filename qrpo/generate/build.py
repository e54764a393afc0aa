"""Step 4, `python -m qrpo.generate.build`: training rows from scored prompt groups, by regime.

    python -m qrpo.generate.build out=runs/gen build.regime=pointwise

Every row carries its prompt's reference rewards; a completion that is itself a reference sample
keeps its `ref_index` (the leave-one-out estimator, `loss.exclude_self`), and `ref_logp` when
computed. Regimes (docs/methods.md, section 2):

- pointwise:    every non-empty reference sample of a prompt, one row per prompt (QRPO, KTO, ...);
- best_worst:   the best and the worst sample as chosen/rejected (prompts whose samples all tie
                are dropped, and counted);
- random_pairs: `build.pairs_per_prompt` disjoint random pairs of samples, seeded per prompt id,
                the better one chosen (tied pairs are dropped);
- offline:      the data's own chosen/rejected pairs (one row each), or without pairs its own
                completions in one pointwise row, scored by the reward step.

Empty samples (EOS at once) count among the reference rewards but are not trained on. The output
is the canonical schema (plus `pairs`), which `python -m qrpo.train` reads once merged.
"""

from __future__ import annotations

import math
import random
import sys

from qrpo.common.data import DataError
from qrpo.generate.runner import cli, exit_on_error, run_shard_step


def _reward(row: dict, j: int, source: str) -> float:
    value = row["completions"][j]["reward"]
    if value is None or not math.isfinite(value):
        raise DataError(
            source,
            row["source_row"],
            f"completions[{j}].reward",
            f"{'missing' if value is None else value} reward for completion "
            f"'{row['completions'][j]['completion_id']}': run the reward step before build",
        )
    return value


def _row(group: dict, completions: list[dict], pair: bool) -> dict:
    return {
        **{
            k: group.get(k)
            for k in ("prompt_id", "prompt", "messages", "source_row", "ref_rewards", "info")
        },
        "completions": [dict(c) for c in completions],
        "chosen": 0 if pair else -1,
        "rejected": 1 if pair else -1,
        "pairs": [[0, 1]] if pair else [],
    }


def build_rows(
    group: dict, regime: str, source: str, *, pairs: int = 1, seed: int = 0
) -> list[dict]:
    """The training rows of one prompt group under `regime` (may be none)."""
    if not group["ref_rewards"]:
        raise DataError(
            source,
            group["source_row"],
            "ref_rewards",
            f"prompt '{group['prompt_id']}' has no reference rewards: sample and score first",
        )
    comps = group["completions"]
    samples = sorted(
        (j for j, c in enumerate(comps) if c["ref_index"] >= 0 and c["text"].strip()),
        key=lambda j: comps[j]["ref_index"],
    )
    if regime == "offline":
        if group["pairs"]:
            rows, used = [], set()
            for a, b in group["pairs"]:
                _reward(group, a, source), _reward(group, b, source)
                pair = []
                for j in (a, b):  # a completion in two pairs gets a distinct id in the second
                    c = dict(comps[j])
                    if c["completion_id"] in used:
                        c["completion_id"] += f"~{len(rows)}"
                    used.add(c["completion_id"])
                    pair.append(c)
                rows.append(_row(group, pair, True))
            return rows
        own = [j for j, c in enumerate(comps) if c["ref_index"] < 0] or list(range(len(comps)))
        own = [j for j in own if comps[j]["text"].strip()]
        for j in own:
            _reward(group, j, source)
        return [_row(group, [comps[j] for j in own], False)] if own else []
    rewards = {j: _reward(group, j, source) for j in samples}
    if regime == "pointwise":
        return [_row(group, [comps[j] for j in samples], False)] if samples else []
    if regime == "best_worst":
        if len(samples) < 2:
            return []
        best = max(samples, key=lambda j: rewards[j])  # the first of equals, by ref_index
        worst = min(samples, key=lambda j: rewards[j])
        if rewards[best] == rewards[worst]:
            return []
        return [_row(group, [comps[best], comps[worst]], True)]
    if regime == "random_pairs":
        rng = random.Random(f"{seed}:{group['prompt_id']}")
        order = list(samples)
        rng.shuffle(order)
        rows = []
        for a, b in list(zip(order[0::2], order[1::2]))[:pairs]:
            if rewards[a] == rewards[b]:
                continue
            if rewards[a] < rewards[b]:
                a, b = b, a
            rows.append(_row(group, [comps[a], comps[b]], True))
        return rows
    raise ValueError(f"unknown regime '{regime}'")


def make_worker(cfg, source: str):
    bc = cfg.build

    def work(rows: list[dict]) -> tuple[list[dict], int]:
        out = []
        for group in rows:
            out += build_rows(group, bc.regime, source, pairs=bc.pairs_per_prompt, seed=bc.seed)
        return out, 0

    return work


def main(argv: list[str] | None = None) -> None:
    cli("build", argv, __doc__, lambda cfg: run_shard_step(cfg, "build", make_worker))


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
