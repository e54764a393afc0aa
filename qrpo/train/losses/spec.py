"""What a training algorithm is, in one place: the `Algorithm` spec and the registry.

Config validation (qrpo/train/config.py), example building (qrpo/train/examples.py), the loop (qrpo/train/train.py,
qrpo/train/fused.py) and the SLURM launcher (qrpo/slurm/train.py) read an algorithm's spec instead of
comparing its name. Each loss module of this package ends with `register_algorithm(Algorithm(...))`;
qrpo/train/losses/__init__.py imports every module of the package, so a new loss is one new file here
(and its test): every entry point, including the processes `accelerate launch` starts, knows it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from qrpo.common.config import ConfigError, choice_error
from qrpo.common.packing import Batch, Sequence


@dataclass
class LossInputs:
    """What a loss may read of one packed micro-batch. Per-sequence tensors are in packing order;
    for pair algorithms, chosen and rejected alternate (chosen at 0::2, rejected at 1::2)."""

    logps: Tensor  # [S] summed completion log-probs under the policy (with gradient)
    batch: Batch  # rewards, num_tokens, ref_rewards, ref_mask, ref_index, desirable, sigma, ...
    ref_logps: Tensor | None = None  # [S] under the reference (precomputed or on the fly)
    values: Tensor | None = None  # [S] the value of each sequence's prompt (see Algorithm)
    kl_logps: tuple[Tensor, Tensor] | None = None  # policy/reference log-probs, mismatched pairs
    generator: torch.Generator | None = None  # randomness a loss draws (randomized quantiles)


# loss(inputs, cfg.loss) -> (per-example loss [E], metrics name -> detached tensor)
LossFn = Callable[[LossInputs, Any], tuple[Tensor, dict[str, Tensor]]]
# build(row, seq, cfg.loss) -> the row's examples, each a list of sequences; `seq(completion,
# desirable=True)` turns one of the row's completions into a Sequence.
BuildFn = Callable[[dict, Callable[..., "Sequence"], Any], list[list["Sequence"]]]


def every_completion(row: dict, seq: Callable, cfg) -> list[list[Sequence]]:
    """Pointwise: each completion of the row is one example (a pair row gives two)."""
    return [[seq(c)] for c in row["completions"]]


def chosen_and_rejected(row: dict, seq: Callable, cfg) -> list[list[Sequence]]:
    """Pairs: one example [chosen, rejected] per row, kept in one micro-batch."""
    comps = row["completions"]
    return [[seq(comps[row["chosen"]]), seq(comps[row["rejected"]])]]


def no_reference_rewards(cfg) -> int:
    return 0


@dataclass(frozen=True)
class Algorithm:
    """Everything the trainer needs to know about one algorithm besides its hyper-parameters,
    which live in `LossConfig` (the loss receives `cfg.loss`)."""

    name: str  # the value of loss.algorithm
    loss: LossFn
    pairs: bool = False  # examples are (chosen, rejected); the data must have pairs
    needs_rewards: bool = False  # every completion must carry a reward
    needs_reference: bool = True  # reference log-probs: precomputed in the data, or a model
    build: BuildFn = every_completion
    # Called once on all training sequences after building: rewards z-scored over the train set,
    # per-prompt statistics of the reference rewards, ...
    prepare: Callable[[list[Sequence], Any], None] | None = None
    min_ref_rewards: Callable[[Any], int] = no_reference_rewards  # fewest per row, given cfg.loss
    # The loop reduces sum(loss) / len(global batch); token_mean: sum(loss) / its completion tokens.
    token_mean: bool = False
    # The loss depends on each sequence only through its own log-prob or its pair's, so the
    # fused head+loss pass (qrpo/train/fused.py) may compute it chunk by chunk.
    fused_head: bool = False
    # LossInputs.values: a per-prompt value table trained with the policy (learned_values, at
    # loss.value_lr), or fixed values computed once before training by
    # prompt_values(ref_logps [N], sequences [N], num_prompts, cfg.loss) -> [num_prompts].
    learned_values: bool = False
    prompt_values: Callable[[Tensor, list[Sequence], int, Any], Tensor] | None = None
    # LossInputs.kl_logps: with a reference model, log-probs of each prompt paired with another
    # example's completion (KTO's reference point).
    mismatched_kl: bool = False

    @property
    def sequences_per_example(self) -> int:
        return 2 if self.pairs else 1


_REGISTRY: dict[str, Algorithm] = {}


def register_algorithm(spec: Algorithm) -> Algorithm:
    """Make `spec` a value of loss.algorithm. A name is registered once."""
    if spec.name in _REGISTRY and _REGISTRY[spec.name] is not spec:
        raise ValueError(f"algorithm {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec
    return spec


def unregister_algorithm(name: str) -> None:
    """Remove a registered algorithm (for tests and notebooks that register their own)."""
    _REGISTRY.pop(name, None)


def algorithm_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_algorithm(name: str) -> Algorithm:
    """The spec of `name`, or the config's error for a wrong loss.algorithm."""
    if name not in _REGISTRY:
        raise ConfigError(choice_error("loss.algorithm", name, algorithm_names()))
    return _REGISTRY[name]
