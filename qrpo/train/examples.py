"""Training examples and the order of global batches (packing is qrpo/common/packing.py).

An *example* is what a loss sees as one item: one sequence (SFT, QRPO, KTO, DRO,
reward-partition) or a chosen/rejected pair (DPO, SimPO, REBEL), which always stays in one
micro-batch. The global batch of a step is a deterministic function of (seed, step), so a resumed
run needs only the step number to continue mid-epoch, and every process computes the same global
batch and takes its share.
"""

from __future__ import annotations

import math

import torch

from qrpo.common.packing import Example, Sequence
from qrpo.train.config import TrainConfig
from qrpo.train.losses import get_algorithm


def build_examples(rows: list[dict], cfg: TrainConfig) -> list[Example]:
    """Canonical tokenized rows -> the algorithm's examples (its spec's `build` and `prepare`)."""
    spec = get_algorithm(cfg.loss.algorithm)
    prompt_index: dict[str, int] = {}
    examples = []
    for row in rows:
        pi = prompt_index.setdefault(row["prompt_id"], len(prompt_index))

        def seq(c: dict, desirable: bool = True, row=row, pi=pi) -> Sequence:
            return _sequence(row, pi, c, cfg.loss.exclude_self, desirable)

        examples.extend(Example(sequences) for sequences in spec.build(row, seq, cfg.loss))
    if spec.prepare is not None:
        spec.prepare([s for e in examples for s in e.sequences], cfg.loss)
    return examples


def mismatched(examples: list[Example]) -> list[Example]:
    """KTO's KL estimate: each prompt with the next example's completion (a cyclic shift)."""
    seqs = [s for e in examples for s in e.sequences]
    out = []
    for i, s in enumerate(seqs):
        other = seqs[(i + 1) % len(seqs)]
        completion = other.input_ids[other.prompt_len :]
        out.append(
            Example(
                [Sequence(s.input_ids[: s.prompt_len] + completion, s.prompt_len, s.prompt_index)]
            )
        )
    return out


def _sequence(
    row: dict, prompt_index: int, c: dict, exclude_self: bool, desirable: bool
) -> Sequence:
    return Sequence(
        input_ids=row["prompt_ids"] + c["completion_ids"],
        prompt_len=len(row["prompt_ids"]),
        prompt_index=prompt_index,
        reward=math.nan if c["reward"] is None else c["reward"],
        ref_logp=math.nan if c.get("ref_logp") is None else c["ref_logp"],
        ref_rewards=list(row["ref_rewards"]),
        ref_index=c["ref_index"] if exclude_self else -1,
        desirable=desirable,
    )


def steps_per_epoch(num_examples: int, examples_per_step: int) -> int:
    return num_examples // examples_per_step


def global_batch_indices(
    num_examples: int, examples_per_step: int, step: int, seed: int
) -> list[int]:
    """Example indices of global step `step` (0-based): a fresh permutation each epoch."""
    per_epoch = steps_per_epoch(num_examples, examples_per_step)
    epoch, k = divmod(step, per_epoch)
    gen = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(num_examples, generator=gen)
    return order[k * examples_per_step : (k + 1) * examples_per_step].tolist()
