"""Loss functions, one module per algorithm, each registering its `Algorithm` spec (spec.py).

Contract shared by every loss formula (the `*_loss` functions):
- inputs are per-sequence log-probs summed over completion tokens (prompt masked), computed
  elsewhere, plus rewards/labels/lengths; hyper-parameters are keyword-only floats;
- the output is `(loss, metrics)`: `loss` is the per-example loss [B], computed in float32
  (bf16/fp16 inputs are upcast; float64 inputs stay float64, for tests); `metrics` maps names
  such as "rewards/margins" or "qrpo/residual" to detached per-example tensors or scalars;
- gradients flow only to the policy log-probs (and, for DRO, to the learned values):
  reference log-probs, rewards and reference statistics are treated as constants;
- the trainer reduces: `loss.mean()` for every loss except SFT, which it reduces as
  `loss.sum() / num_tokens.sum()` (token-mean NLL; see `sft_loss`).

The trainer calls every algorithm the same way, `spec.loss(LossInputs, cfg.loss)`; each module's
spec adapts that call to its formula's arguments. Every module of this package is imported here,
so a new loss is one new file in this folder that ends with `register_algorithm(Algorithm(...))`.
"""

import importlib
import pkgutil

from qrpo.train.losses.common import zscore
from qrpo.train.losses.dpo import dpo_loss
from qrpo.train.losses.dro import dro_loss
from qrpo.train.losses.kto import kto_loss
from qrpo.train.losses.qrpo import qrpo_trainer_loss
from qrpo.train.losses.rebel import rebel_loss
from qrpo.train.losses.rpo_partition import rpo_partition_loss, rpo_partition_values
from qrpo.train.losses.sft import sft_loss
from qrpo.train.losses.simpo import simpo_loss
from qrpo.train.losses.spec import (
    Algorithm,
    LossInputs,
    algorithm_names,
    get_algorithm,
    register_algorithm,
    unregister_algorithm,
)

# The modules not named above: losses added as files of this folder.
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = [
    "Algorithm",
    "LossInputs",
    "algorithm_names",
    "dpo_loss",
    "dro_loss",
    "get_algorithm",
    "kto_loss",
    "qrpo_trainer_loss",
    "rebel_loss",
    "register_algorithm",
    "rpo_partition_loss",
    "rpo_partition_values",
    "sft_loss",
    "simpo_loss",
    "unregister_algorithm",
    "zscore",
]
