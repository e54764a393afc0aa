"""No-logits kernels for QRPO: per-sequence log-probs from the LM head, and the QRPO loss.

    from qrpo.kernels import sequence_logprobs, qrpo_loss, log_partition, fused_head_loss

Triton is imported only when a Triton backend is used, so the package works on CPU-only installs.
"""

from qrpo.kernels.fused_head import fused_head_loss
from qrpo.kernels.logprobs_api import SequenceLogprobs, sequence_logprobs
from qrpo.kernels.partition import PARTITIONS
from qrpo.kernels.qrpo import QRPOStats, log_partition
from qrpo.kernels.qrpo_api import QRPOLoss, qrpo_loss

__all__ = [
    "sequence_logprobs",
    "fused_head_loss",
    "qrpo_loss",
    "log_partition",
    "SequenceLogprobs",
    "QRPOLoss",
    "QRPOStats",
    "PARTITIONS",
]
