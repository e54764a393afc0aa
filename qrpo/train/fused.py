"""The fused head+loss pass in the training loop (`loss.fused_head`).

For algorithms whose loss depends on each sequence only through its own log-prob or its pair's
(their spec says `fused_head=True`: SFT, QRPO; DPO, SimPO, REBEL), `kernels.fused_head_loss` computes the log-probs, the loss and
the LM head's gradients in one sweep over the vocabulary (3 GEMM units instead of 4). The loss is
the loop's own: the spec's loss on the micro-batch, summed, as a closure of the log-probs, so the
fused and the two-pass paths give the same loss and gradients (tests/train/test_fused_loop.py).
KTO (its reference point is estimated from other completions), DRO (its value table is a
trainable parameter of the loss) and reward partitioning take the two-pass path.

Setting: `loss.fused_head` null (default) = on with CUDA where the algorithm allows, off on CPU,
where the torch backend's two passes are faster than holding a chunk's logits; true = on where
the algorithm allows (also on CPU, as in the tests); false = off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qrpo.common.packing import Batch
from qrpo.train.losses import get_algorithm


def fused_head_applies(cfg, device: torch.device) -> bool:
    allowed = get_algorithm(cfg.loss.algorithm).fused_head and cfg.loss.kernel_backend != "naive"
    if cfg.loss.fused_head is None:
        return allowed and device.type == "cuda"
    return allowed and bool(cfg.loss.fused_head)


def fused_micro_batch_loss(
    cfg,
    policy,
    batch: Batch,
    per_example: Callable[[torch.Tensor], tuple[torch.Tensor, dict]],
    generator: torch.Generator,
) -> tuple[torch.Tensor, dict]:
    """The micro-batch's summed loss (gradients computed in the forward) and its metrics.

    `per_example(logps)` is the loop's loss of this micro-batch. It is called once per chunk
    and once more for the metrics; the generator is rewound before each call, so a randomized
    quantile estimator draws the same numbers every time, and the generator ends one draw on,
    as after the two-pass path."""
    state = generator.get_state()

    def loss_fn(logps: torch.Tensor) -> torch.Tensor:
        generator.set_state(state)
        return per_example(logps)[0].sum()

    loss, logps = policy(
        *batch.model_inputs(),
        loss_fn=loss_fn,
        group_size=get_algorithm(cfg.loss.algorithm).sequences_per_example,
        host_cu_seqlens=batch.host_score_cu_seqlens,
    )
    generator.set_state(state)
    _, metrics = per_example(logps)
    return loss, metrics
