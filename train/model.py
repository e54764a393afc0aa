"""The policy as the losses see it: packed tokens in, one summed log-prob per sequence out.

The backbone returns final hidden states; `kernels.sequence_logprobs` combines them with the LM
head weight in tiles, so the [tokens x vocab] logits never exist. Everything happens inside this
module's `forward()`, which is what DDP and FSDP2 wrap: under FSDP2 the head weight is gathered
for this forward like any other parameter (a call outside forward would see a sharded DTensor
beside plain tensors). The packed row's boundaries reach the attention path chosen at load time
(common/attention.py), so attention costs the sequences' squares, not the row's.
"""

from __future__ import annotations

import torch
from torch import nn

import kernels
from common.attention import packing_kwargs


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
        are the sequences' boundaries in the row, for varlen attention (see train.data.collate).
        With `fused` (loss_fn, group_size, host_cu_seqlens: train/fused.py) it returns
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
