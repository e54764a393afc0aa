"""Loss functions, one module per algorithm.

Contract shared by every loss (STYLE.md point 7):
- inputs are per-sequence log-probs summed over completion tokens (prompt masked), computed
  elsewhere, plus rewards/labels/lengths; hyper-parameters are keyword-only floats;
- the output is `(loss, metrics)`: `loss` is the per-example loss [B], computed in float32
  (bf16/fp16 inputs are upcast; float64 inputs stay float64, for tests); `metrics` maps names
  such as "rewards/margins" or "qrpo/residual" to detached per-example tensors or scalars;
- gradients flow only to the policy log-probs (and, for DRO, to the learned values):
  reference log-probs, rewards and reference statistics are treated as constants;
- the trainer reduces: `loss.mean()` for every loss except SFT, which it reduces as
  `loss.sum() / num_tokens.sum()` (token-mean NLL; see `sft_loss`).
"""

from collections.abc import Callable

from train.losses.common import zscore
from train.losses.dpo import dpo_loss
from train.losses.dro import dro_loss
from train.losses.kto import kto_loss
from train.losses.qrpo import qrpo_loss
from train.losses.rebel import rebel_loss
from train.losses.rpo_partition import rpo_partition_loss, rpo_partition_values
from train.losses.sft import sft_loss
from train.losses.simpo import simpo_loss

LOSSES: dict[str, Callable[..., tuple]] = {
    "sft": sft_loss,
    "qrpo": qrpo_loss,
    "dpo": dpo_loss,
    "simpo": simpo_loss,
    "rebel": rebel_loss,
    "kto": kto_loss,
    "dro": dro_loss,
    "rpo_partition": rpo_partition_loss,
}

__all__ = [
    "LOSSES",
    "dpo_loss",
    "dro_loss",
    "kto_loss",
    "qrpo_loss",
    "rebel_loss",
    "rpo_partition_loss",
    "rpo_partition_values",
    "sft_loss",
    "simpo_loss",
    "zscore",
]
