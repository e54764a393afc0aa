"""A causal LM as the losses see it: packed tokens in, one summed log-prob per sequence out.

The backbone returns final hidden states; `kernels.sequence_logprobs` combines them with the LM
head weight in tiles, so the [tokens x vocab] logits never exist. Everything happens inside
`SequenceLogprobModel.forward()`, which is what DDP and FSDP2 wrap: under FSDP2 the head weight is
gathered for this forward like any other parameter (a call outside forward would see a sharded
DTensor beside plain tensors). The packed row's boundaries reach the attention path chosen at load
time (qrpo/common/attention.py), so attention costs the sequences' squares, not the row's.

Training, reference log-probs (generate) and evaluation all score through this module and
`sequence_logps`, with the same precision policy (`autocast`), so a precomputed reference equals
what the loop would compute.
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
from torch import nn

from qrpo import kernels
from qrpo.common.attention import packing_kwargs
from qrpo.common.packing import Example, collate, pack

# The autocast dtype of each `run.mixed_precision` / `ref_logps.mixed_precision` value
# (qrpo.common.model.MIXED_PRECISIONS).
_COMPUTE_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def compute_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a mixed-precision setting; None for "no"."""
    return _COMPUTE_DTYPES.get(mixed_precision)


def autocast(device: torch.device, mixed_precision: str) -> AbstractContextManager:
    """Autocast as accelerate applies it in the training loop, for code outside the loop."""
    dtype = compute_dtype(mixed_precision)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


class SequenceLogprobModel(nn.Module):
    def __init__(self, causal_lm: nn.Module, backend: str = "auto", num_values: int = 0):
        super().__init__()
        self.model = causal_lm
        self.backend = backend
        # DRO's learned per-prompt value V(x); an empty table for every other algorithm.
        self.values = nn.Parameter(torch.zeros(num_values)) if num_values else None
        # FSDP auto-wrapping reads the layer classes from the wrapped model.
        self._no_split_modules = getattr(causal_lm, "_no_split_modules", None)

    def forward(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        score_index: torch.Tensor,
        score_targets: torch.Tensor,
        score_cu_seqlens: torch.Tensor,
        cu_seqlens: torch.Tensor,
        max_seqlen: int,
        **fused,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probs [S] of the packed row's sequences. `score_index` lists the positions
        whose next token counts (completion tokens), `score_targets` those tokens, and
        `score_cu_seqlens` the sequence boundaries among them; `cu_seqlens` and `max_seqlen`
        are the sequences' boundaries in the row, for varlen attention (see
        qrpo.common.packing.collate). With `fused` (loss_fn, group_size, host_cu_seqlens) it returns
        (loss, detached log-probs) of the fused head+loss pass instead; it goes through
        forward() so that DDP and FSDP2 see the call."""
        packing = packing_kwargs(self.model.config._attn_implementation, cu_seqlens, max_seqlen)
        # use_cache=False: with a cache, packed sequences would see each other.
        hidden = self.model.base_model(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **packing
        ).last_hidden_state[0]
        hidden = hidden.index_select(0, score_index)
        head = self.model.get_output_embeddings()
        weight, bias = head.weight, getattr(head, "bias", None)
        if torch.is_autocast_enabled(hidden.device.type):
            dtype = torch.get_autocast_dtype(hidden.device.type)
        else:
            dtype = weight.dtype
        # The kernel takes max/LSE/target logit from fp32 accumulators itself; autocast inside it
        # would round its internal matmuls, so it is switched off around the call.
        with torch.autocast(hidden.device.type, enabled=False):
            args = (hidden.to(dtype), weight.to(dtype), score_targets, score_cu_seqlens)
            options = dict(
                bias=None if bias is None else bias.to(dtype),
                backend=self.backend,
                check_targets=False,
            )
            if fused:
                return kernels.fused_head_loss(*args, **options, **fused)
            return kernels.sequence_logprobs(*args, **options)


@torch.no_grad()
def sequence_logps(
    model: nn.Module, examples: list[Example], token_budget: int, device: torch.device
) -> torch.Tensor:
    """Summed completion log-probs of every sequence of `examples`, in order (no gradient)."""
    out = []
    for group in pack(examples, token_budget):
        b = collate(group, device)
        out.append(model(*b.model_inputs()).float())
    return torch.cat(out) if out else torch.zeros(0, device=device)
