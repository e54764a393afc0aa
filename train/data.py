"""Training examples and the order of global batches (packing is common/packing.py).

An *example* is what a loss sees as one item: one sequence (SFT, QRPO, KTO, DRO,
reward-partition) or a chosen/rejected pair (DPO, SimPO, REBEL), which always stays in one
micro-batch. The global batch of a step is a deterministic function of (seed, step), so a resumed
run needs only the step number to continue mid-epoch, and every process computes the same global
batch and takes its share.
"""

from __future__ import annotations

import math

import torch

from common.packing import Example, Sequence
from train.config import PAIR_ALGORITHMS, TrainConfig
from train.losses import zscore


def build_examples(rows: list[dict], cfg: TrainConfig) -> list[Example]:
    """Canonical tokenized rows -> the algorithm's examples."""
    algo = cfg.loss.algorithm
    prompt_index: dict[str, int] = {}
    examples = []
    for row in rows:
        pi = prompt_index.setdefault(row["prompt_id"], len(prompt_index))

        def seq(c: dict, desirable: bool = True, row=row, pi=pi) -> Sequence:
            return _sequence(row, pi, c, cfg.loss.exclude_self, desirable)

        comps = row["completions"]
        if algo in PAIR_ALGORITHMS:
            examples.append(Example([seq(comps[row["chosen"]]), seq(comps[row["rejected"]])]))
        elif algo == "sft":
            use = [comps[row["chosen"]]] if row["chosen"] >= 0 else comps
            examples.extend(Example([seq(c)]) for c in use)
        elif algo == "kto":
            for j, c in enumerate(comps):
                if row["chosen"] >= 0:
                    good = j == row["chosen"]
                else:
                    good = c["reward"] is not None and c["reward"] >= cfg.loss.kto_threshold
                examples.append(Example([seq(c, desirable=good)]))
        else:  # pointwise algorithms: every completion is a sample (pairs give two)
            examples.extend(Example([seq(c)]) for c in comps)
    if algo in ("dro", "rpo_partition"):
        _zscore_rewards(examples)
    if algo == "qrpo" and cfg.loss.transform == "scaled_normal_icdf":
        _reference_sigmas(examples)
    return examples


def _reference_sigmas(examples: list[Example]) -> None:
    """sigma = per-prompt std (ddof 1) of the reference rewards / its mean over the train set."""
    seqs = [s for e in examples for s in e.sequences]
    stds = [torch.tensor(s.ref_rewards, dtype=torch.float64).std().item() for s in seqs]
    mean = sum(stds) / len(stds)
    for s, std in zip(seqs, stds):
        # A prompt whose reference rewards all tie gets f(q) ~ 0: a target of "stay at the
        # reference". The floor keeps sigma inside the kernel's domain (sigma > 0).
        s.sigma = max(std / mean, 1e-6) if mean > 0 else 1.0


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


def _zscore_rewards(examples: list[Example]) -> None:
    """DRO and reward partitioning standardise rewards over the training set (REFERENCE.md 3)."""
    seqs = [s for e in examples for s in e.sequences]
    standard = zscore(torch.tensor([s.reward for s in seqs], dtype=torch.float64)).tolist()
    for s, r in zip(seqs, standard):
        s.reward = r


def sequences_per_example(cfg: TrainConfig) -> int:
    return 2 if cfg.loss.algorithm in PAIR_ALGORITHMS else 1


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
