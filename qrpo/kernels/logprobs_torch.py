"""Per-sequence log-probs in chunked PyTorch: the CPU path and the CUDA fallback.

Computes the same quantity as the naive reference (qrpo/kernels/reference.py) but never holds more
than one [C, V_slice] tile of logits: forward keeps only the per-token log-sum-exp, backward
recomputes the logits chunk by chunk and accumulates dW (and db) in fp32. Its chunk sizes are
`ChunkConfig` in qrpo/kernels/tiles.py.
"""

from __future__ import annotations

import torch
from torch import Tensor

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels.segments import PackedTargets, accumulation_dtype, segment_sum
from qrpo.kernels.tiles import chunk_config


def _slice_logits(h: Tensor, w: Tensor, b: Tensor | None, scale: float) -> Tensor:
    """lin = (h w^T + b) * scale, one [C, Vs] tile in h's dtype (the accumulation dtype)."""
    lin = torch.mm(h, w.t()) if b is None else torch.addmm(b, h, w.t())
    return lin if scale == 1.0 else lin.mul_(scale)


def _local_targets(targets: Tensor, v0: int, v1: int) -> tuple[Tensor, Tensor]:
    """Targets as column indices of the slice [v0, v1), and which of them fall inside it."""
    hit = (targets >= v0) & (targets < v1)  # IGNORE_INDEX (-100) is never inside
    return torch.where(hit, targets - v0, 0)[:, None], hit


class ChunkedSequenceLogprobs(torch.autograd.Function):
    """Bounded-memory per-sequence log-probs; backward recomputes logits chunk by chunk."""

    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedTargets
    ) -> Tensor:
        n, d = hidden.shape
        v = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        chunk, v_slice = chunk_config(hidden.device).plan(n, v, d, hidden.dtype)
        inv_t = 1.0 / packed.temperature
        cap = packed.softcap
        token_logp = torch.zeros(n, dtype=acc, device=hidden.device)
        lse = torch.empty(n, dtype=acc, device=hidden.device)
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            h = hidden[c0:c1].to(acc)
            tgt = packed.targets[c0:c1]
            m = torch.full((c1 - c0,), float("-inf"), dtype=acc, device=hidden.device)
            s = torch.zeros(c1 - c0, dtype=acc, device=hidden.device)
            z_target = torch.zeros(c1 - c0, dtype=acc, device=hidden.device)
            for v0 in range(0, v, v_slice):
                v1 = min(v, v0 + v_slice)
                b = None if bias is None else bias[v0:v1].to(acc)
                if cap is None:
                    z = _slice_logits(h, weight[v0:v1].to(acc), b, inv_t)
                else:
                    z = _slice_logits(h, weight[v0:v1].to(acc), b, inv_t / cap).tanh_().mul_(cap)
                local, hit = _local_targets(tgt, v0, v1)
                z_target += torch.where(hit, z.gather(1, local).squeeze(1), 0.0)
                # Online log-sum-exp over vocab slices, in place on the tile.
                m_new = torch.maximum(m, z.amax(1))
                s = s * torch.exp(m - m_new) + z.sub_(m_new[:, None]).exp_().sum(1)
                m = m_new
                del z
            lse[c0:c1] = m + torch.log(s)
            valid = tgt != IGNORE_INDEX
            token_logp[c0:c1] = torch.where(valid, z_target - lse[c0:c1], 0.0)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.packed = packed
        return segment_sum(token_logp, packed.seq_id, packed.num_seqs)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, lse = ctx.saved_tensors
        packed: PackedTargets = ctx.packed
        n, d = hidden.shape
        v = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        chunk, v_slice = chunk_config(hidden.device).plan(n, v, d, hidden.dtype)
        inv_t = 1.0 / packed.temperature
        cap = packed.softcap

        # g_t = dL/dlogp[seq(t)] for scored tokens, 0 otherwise (empty/masked sequences -> 0).
        valid = packed.targets != IGNORE_INDEX
        g_tok = torch.where(valid, grad_out.to(acc)[packed.seq_id], 0.0)

        grad_h = torch.empty_like(hidden) if need_h else None
        # dW accumulates in fp32 across chunks: in place into the result for fp32 weights, else
        # into a V x D fp32 buffer that is rounded once at the end.
        grad_w = torch.zeros(v, d, dtype=acc, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=acc, device=weight.device) if need_b else None
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            h = hidden[c0:c1].to(acc)
            # 1/T is a per-tile scalar of dlin, folded into g to save a pass over the tile.
            g = g_tok[c0:c1, None] * inv_t
            lse_c = lse[c0:c1, None]
            tgt = packed.targets[c0:c1]
            dh = torch.zeros(c1 - c0, d, dtype=acc, device=hidden.device) if need_h else None
            for v0 in range(0, v, v_slice):
                v1 = min(v, v0 + v_slice)
                w = weight[v0:v1].to(acc)
                b = None if bias is None else bias[v0:v1].to(acc)
                if cap is None:
                    # One [C, Vs] tile, transformed in place: lin -> z -> p -> dz -> dlin.
                    dlin = _slice_logits(h, w, b, inv_t).sub_(lse_c).exp_()
                    tanh = None
                else:
                    tanh = _slice_logits(h, w, b, inv_t / cap).tanh_()
                    dlin = torch.mul(tanh, cap).sub_(lse_c).exp_()  # second tile
                local, hit = _local_targets(tgt, v0, v1)
                # dz = g * (onehot(target) - softmax(z)) = -g * p, plus g at the target column
                dlin.mul_(-g).scatter_add_(1, local, torch.where(hit[:, None], g, 0.0))
                if tanh is not None:
                    dlin.mul_(tanh.square_().neg_().add_(1.0))  # dz/dlin = (1 - tanh^2) / T
                    del tanh
                if need_h:
                    dh.addmm_(dlin, w)
                if need_w:
                    grad_w[v0:v1].addmm_(dlin.t(), h)
                if need_b:
                    grad_b[v0:v1] += dlin.sum(0)
                del dlin
            if need_h:
                grad_h[c0:c1] = dh
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None


def chunked_sequence_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedTargets
) -> Tensor:
    return ChunkedSequenceLogprobs.apply(hidden, weight, bias, packed)
