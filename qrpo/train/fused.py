"""The fused head+loss pass in the training loop (`loss.fused_head`).

For algorithms whose loss depends on each sequence only through its own log-prob or its pair's
(their spec says `fused_head=True`: SFT, QRPO; DPO, SimPO, REBEL), `kernels.fused_head_loss` computes the log-probs, the loss and
the LM head's gradients in one sweep over the vocabulary (3 GEMM units instead of 4). The loss is
the loop's own: the spec's loss on the micro-batch, summed, as a closure of the log-probs, so the
fused and the two-pass paths give the same loss and gradients (tests/train/test_fused_loop.py).
KTO (its reference point is estimated from other completions), DRO (its value table is a
trainable parameter of the loss) and reward partitioning take the two-pass path.

Setting: `loss.fused_head` null (default) = the path measured faster, which today is the two
passes at every shape measured: on an H200 at the 1B bench's shapes the fused pass cost 21 % of
DPO's and 26 % of QRPO's step throughput, and in the kernel bench (Llama-3 head, 16k tokens) it
took 138-335 ms against 124 ms for `sequence_logprobs` (BENCHMARKS.md); on CPU the torch
backend's two passes are faster than holding a chunk's logits. true = on where the algorithm
allows (on CPU too, as in the tests); false = off. When a GPU measurement shows the fused pass
faster at a shape, `FUSED_FASTER` names that shape and the default follows it there.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from qrpo.common.packing import Batch
from qrpo.train.losses import get_algorithm

# Where the fused pass was measured faster than the two passes: (device type, algorithm) pairs.
# Empty: no measured shape yet (see the module docstring); the default then runs two passes.
FUSED_FASTER: frozenset[tuple[str, str]] = frozenset()


def fused_head_choice(cfg, device: torch.device) -> tuple[bool, str]:
    """Whether the loop runs the fused head+loss pass, and why (the loop logs it once)."""
    algorithm = cfg.loss.algorithm
    if not get_algorithm(algorithm).fused_head:
        return False, f"head: two passes ({algorithm} has no fused head+loss pass)"
    if cfg.loss.kernel_backend == "naive":
        return False, "head: two passes (loss.kernel_backend=naive builds the full logits)"
    if cfg.loss.fused_head is not None:
        on = bool(cfg.loss.fused_head)
        return on, f"head: {'fused head+loss pass' if on else 'two passes'} (loss.fused_head={on})"
    if (device.type, algorithm) in FUSED_FASTER:
        return (
            True,
            f"head: fused head+loss pass (measured faster for {algorithm} on {device.type})",
        )
    return False, (
        "head: two passes (loss.fused_head=null: faster than the fused pass at every shape "
        "measured, BENCHMARKS.md; loss.fused_head=true forces the fused pass)"
    )


def fused_head_applies(cfg, device: torch.device) -> bool:
    return fused_head_choice(cfg, device)[0]


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
