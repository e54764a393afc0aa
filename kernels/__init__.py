"""No-logits kernels for QRPO: per-sequence log-probs from the LM head, and the QRPO loss.

    from kernels import sequence_logprobs, qrpo_loss, log_partition

Triton is imported only when a Triton backend is used, so the package works on CPU-only installs.
"""

from kernels.api import QRPOLoss, SequenceLogprobs, qrpo_loss, sequence_logprobs
from kernels.partition import PARTITIONS
from kernels.qrpo import QRPOStats, log_partition

__all__ = [
    "sequence_logprobs",
    "qrpo_loss",
    "log_partition",
    "SequenceLogprobs",
    "QRPOLoss",
    "QRPOStats",
    "PARTITIONS",
]
