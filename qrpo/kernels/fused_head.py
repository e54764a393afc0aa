"""The fused head+loss pass: per-sequence log-probs, the loss, and its gradients in one sweep.

    loss, logps = fused_head_loss(hidden, weight, targets, cu_seqlens, loss_fn, group_size=2)
    loss.backward()          # only scales the gradients computed in the forward

When the loss depends on each sequence only through its summed log-prob and the log-probs of its
own group (QRPO, SFT: one sequence; DPO, SimPO, REBEL: a chosen/rejected pair), the gradient of
the loss w.r.t. a token's logits is known as soon as its group's log-probs are. So the tokens are
cut into chunks of whole groups; per chunk the logits are computed once (1 GEMM unit), kept in an
fp32 [C, V] buffer, the chunk's log-probs finished, d loss / d logp evaluated by autograd on
`loss_fn`, and dH = dlin W and dW += dlin^T H produced right away (2 units): 3 GEMM units in all
instead of the 4 of a forward plus a backward that recomputes the logits ("gradient in forward",
as Liger's fused linear cross-entropy does for token-level CE and its chunked_loss module for
DPO/SimPO). A group longer than a chunk falls back to two passes over its rows (forward to get its
log-probs, then a backward that recomputes the logits).

The contract on `loss_fn(logps[S]) -> scalar` (it is what makes gradient-in-forward exact): it is
a sum of terms, each a function of one group's log-probs (groups are `group_size` consecutive
sequences) and of constants. It may close over per-sequence tensors (rewards, reference log-probs,
per-sample weights, a global normaliser). It is evaluated once per chunk on the full [S] vector
whose not-yet-known entries are 0, and once at the end on the finished vector; only the chunk's
entries receive a gradient. It must give the same value on every call (a loss that draws random
numbers must draw the same ones each time, see qrpo/train/fused.py).

Memory: the [C, V] fp32 logits of a chunk (C*V <= MAX_LOGITS_ELEMENTS, 1 GiB on CUDA, stretched
up to 2 GiB to keep the largest group whole), and an fp32 [V, D] dW accumulator (dW of
several chunks is summed in fp32, never in bf16). The weight gradient is kept from forward to
backward in the weight's dtype and scaled there by the upstream gradient (one more rounding for
half weights when that scale is not a power of two).

Backends: "torch" (per chunk full-vocabulary logits in plain torch; the CPU reference) and
"triton" (the kernels of qrpo/kernels/logprobs_triton.py: the forward stores the fp32 logits tile as it
computes the log-sum-exp, the backward kernel reads them back, cuBLAS does dH and dW).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels.checks import resolve_backend
from qrpo.kernels.logprobs_api import check_logprob_args, sequence_logprobs
from qrpo.kernels.segments import accumulation_dtype, segment_sum, sequence_ids

LossFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class FusedSpec:
    """The non-differentiable half of a fused call."""

    targets: Tensor  # [N] int64
    seq_id: Tensor  # [N] sequence of each token
    bounds: list[int]  # host copy of cu_seqlens
    loss_fn: LossFn
    group_size: int
    temperature: float
    softcap: float | None
    chunk_tokens: int
    backend: str  # "torch" | "triton"


def plan_chunks(bounds: list[int], group_size: int, chunk_tokens: int) -> list[tuple[int, int]]:
    """Chunks of whole groups [(s0, s1)], each <= chunk_tokens tokens, greedy in order. A group
    longer than chunk_tokens is a chunk of its own (it then takes the two-pass route)."""
    num_seqs = len(bounds) - 1
    chunks: list[tuple[int, int]] = []
    s0 = 0
    for g0 in range(0, num_seqs, group_size):
        g1 = min(num_seqs, g0 + group_size)
        if g0 > s0 and bounds[g1] - bounds[s0] > chunk_tokens:
            chunks.append((s0, g0))
            s0 = g0
    if s0 < num_seqs or not chunks:
        chunks.append((s0, num_seqs))
    return chunks


def loss_gradient(loss_fn: LossFn, logps: Tensor, s0: int, s1: int) -> Tensor:
    """d loss_fn / d logps[s0:s1], the other entries held constant."""
    with torch.enable_grad():
        part = logps[s0:s1].detach().clone().requires_grad_()
        full = torch.cat([logps[:s0].detach(), part, logps[s1:].detach()])
        loss = loss_fn(full)
        if loss.dim() != 0:
            raise ValueError(f"loss_fn must return a scalar, got shape {tuple(loss.shape)}")
        (grad,) = torch.autograd.grad(loss, part, allow_unused=True)
    return torch.zeros_like(part) if grad is None else grad.detach().to(logps.dtype)


# ---------------------------------------------------------------------------------------------
# The torch engine: plain full-vocabulary logits per chunk (reference and CPU path)
# ---------------------------------------------------------------------------------------------


class TorchEngine:
    @staticmethod
    def logits(h, weight, bias, temperature, softcap) -> Tensor:
        acc = accumulation_dtype(h.dtype)
        z = h.to(acc) @ weight.to(acc).t()
        if bias is not None:
            z += bias.to(acc)
        z /= temperature
        return z if softcap is None else softcap * torch.tanh(z / softcap)

    @classmethod
    def forward(cls, h, weight, bias, targets, temperature, softcap, store: bool):
        z = cls.logits(h, weight, bias, temperature, softcap)
        lse = torch.logsumexp(z, dim=1)
        valid = targets != IGNORE_INDEX
        picked = z.gather(1, torch.where(valid, targets, 0)[:, None]).squeeze(1)
        return torch.where(valid, picked - lse, 0.0), lse, z if store else None

    @classmethod
    def backward(cls, h, weight, bias, targets, lse, g_tok, temperature, softcap, *, dh_acc,
                 dw_acc, db_acc, z=None):  # fmt: skip
        if z is None:
            z = cls.logits(h, weight, bias, temperature, softcap)
        acc = z.dtype
        dz = torch.exp(z - lse[:, None]).mul_(-g_tok[:, None].to(acc))
        valid = targets != IGNORE_INDEX
        dz.scatter_add_(
            1, torch.where(valid, targets, 0)[:, None], torch.where(valid, g_tok, 0.0)[:, None]
        )
        if softcap is not None:
            dz *= 1.0 - (z / softcap) ** 2
        dlin = dz / temperature
        if dh_acc is not None:
            dh_acc += dlin @ weight.to(acc)
        if dw_acc is not None:
            dw_acc += dlin.t() @ h.to(acc)
        if db_acc is not None:
            db_acc += dlin.sum(0)


class TritonEngine:
    @staticmethod
    def forward(h, weight, bias, targets, temperature, softcap, store: bool):
        from qrpo.kernels.logprobs_triton import logprobs_forward

        z = None
        if store:
            z = torch.empty(h.shape[0], weight.shape[0], dtype=torch.float32, device=h.device)
        token_logp, lse = logprobs_forward(h, weight, bias, targets, temperature, softcap, z)
        return token_logp, lse, z

    @staticmethod
    def backward(h, weight, bias, targets, lse, g_tok, temperature, softcap, *, dh_acc, dw_acc,
                 db_acc, z=None):  # fmt: skip
        from qrpo.kernels.logprobs_triton import head_backward

        head_backward(
            h, weight, bias, targets, lse, g_tok.float(), temperature, softcap,
            dh_acc=dh_acc, dw_acc=dw_acc, db_acc=db_acc, z=z,
        )  # fmt: skip


ENGINES = {"torch": TorchEngine, "triton": TritonEngine}


# ---------------------------------------------------------------------------------------------
# The autograd Function
# ---------------------------------------------------------------------------------------------


class FusedHeadLoss(torch.autograd.Function):
    """Outputs (loss, logps): loss = loss_fn(logps) with its gradients computed in forward;
    logps [S] is returned detached (for metrics)."""

    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, spec: FusedSpec):
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        engine = ENGINES[spec.backend]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, d = hidden.shape
        v = weight.shape[0]
        acc = accumulation_dtype(hidden.dtype)
        bounds, targets = spec.bounds, spec.targets
        num_seqs = len(bounds) - 1
        seq_id = spec.seq_id
        valid = targets != IGNORE_INDEX
        args = (spec.temperature, spec.softcap)

        logps = torch.zeros(num_seqs, dtype=acc, device=hidden.device)
        grad_h = torch.zeros_like(hidden) if need_h else None
        dw_acc = torch.zeros(v, d, dtype=acc, device=hidden.device) if need_w else None
        db_acc = torch.zeros(v, dtype=acc, device=hidden.device) if need_b else None
        for s0, s1 in plan_chunks(bounds, spec.group_size, spec.chunk_tokens):
            t0, t1 = bounds[s0], bounds[s1]
            if t1 == t0:
                continue  # empty sequences only: log-prob 0, no token, no gradient
            # Rows of the chunk, in sub-chunks of <= chunk_tokens: one for a chunk of whole
            # groups (logits stored, 3 units), several for an over-long group (two passes).
            subs = [(r, min(t1, r + spec.chunk_tokens)) for r in range(t0, t1, spec.chunk_tokens)]
            store = len(subs) == 1
            saved = []
            for r0, r1 in subs:
                tok, lse, z = engine.forward(
                    hidden[r0:r1], weight, bias, targets[r0:r1], *args, store=store
                )
                logps += segment_sum(tok, seq_id[r0:r1], num_seqs).to(acc)
                saved.append((lse, z))
            g = torch.zeros_like(logps)
            g[s0:s1] = loss_gradient(spec.loss_fn, logps, s0, s1)
            for (r0, r1), (lse, z) in zip(subs, saved):
                g_tok = torch.where(valid[r0:r1], g[seq_id[r0:r1]], 0.0)
                dh = torch.zeros(r1 - r0, d, dtype=acc, device=hidden.device) if need_h else None
                engine.backward(
                    hidden[r0:r1], weight, bias, targets[r0:r1], lse, g_tok, *args,
                    dh_acc=dh, dw_acc=dw_acc, db_acc=db_acc, z=z,
                )  # fmt: skip
                if need_h:
                    grad_h[r0:r1] = dh
            del saved
        with torch.no_grad():
            loss = spec.loss_fn(logps)
        grad_w = dw_acc.to(weight.dtype) if need_w else None
        grad_b = db_acc.to(bias.dtype) if need_b else None
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(logps)
        return loss.detach(), logps

    @staticmethod
    def backward(ctx, grad_loss: Tensor, _grad_logps: Tensor | None):
        grad_h, grad_w, grad_b = ctx.saved_tensors

        def scaled(g: Tensor | None) -> Tensor | None:
            return None if g is None else (g * grad_loss).to(g.dtype)

        return scaled(grad_h), scaled(grad_w), scaled(grad_b), None


# ---------------------------------------------------------------------------------------------
# Functional entry point
# ---------------------------------------------------------------------------------------------

# fp32 logits kept per chunk: 1 GiB on CUDA (C = 2,093 tokens at V = 128,256), 64 MiB on CPU.
MAX_LOGITS_ELEMENTS = {"cuda": 2**28, "cpu": 2**24}


def default_chunk_tokens(bounds: list[int], group_size: int, vocab: int, device: str) -> int:
    """MAX_LOGITS_ELEMENTS // V tokens, stretched up to twice that so that the largest group
    still fits whole (a pair of two 1,000-token sequences at V = 152,064 needs 1.2 GiB)."""
    budget = max(1, MAX_LOGITS_ELEMENTS[device] // max(vocab, 1))
    num_seqs = len(bounds) - 1
    largest = max(
        (bounds[min(num_seqs, g + group_size)] - bounds[g] for g in range(0, num_seqs, group_size)),
        default=0,
    )
    return max(budget, min(largest, 2 * budget))


def fused_head_loss(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    cu_seqlens: Tensor,
    loss_fn: LossFn,
    *,
    group_size: int = 1,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    backend: str = "auto",
    check_targets: bool = True,
    host_cu_seqlens: list[int] | None = None,
    chunk_tokens: int | None = None,
) -> tuple[Tensor, Tensor]:
    """loss_fn of the per-sequence log-probs, with the LM head's gradients computed in forward.

    Same log-prob contract as `kernels.sequence_logprobs` (shifted targets, -100 = skip, packed
    sequences, temperature, softcap, fp32 accumulation); see the module docstring for the
    contract on `loss_fn`.

    Args:
        hidden, weight, targets, cu_seqlens, bias, temperature, softcap, check_targets: as in
            `sequence_logprobs`.
        loss_fn: logps [S] (fp32; float64 for float64 inputs) -> scalar loss.
        group_size: sequences per group (2 for chosen/rejected pairs at 2i, 2i+1); S must be a
            multiple of it. A chunk never splits a group.
        backend: "auto" (triton on CUDA, torch otherwise), "triton" or "torch".
        host_cu_seqlens: cu_seqlens as a Python list, for planning the chunks on the host. When
            None it is read from `cu_seqlens` (one device sync on CUDA).
        chunk_tokens: tokens per chunk (default: `default_chunk_tokens`).

    Returns:
        (loss, logps): the scalar loss, differentiable w.r.t. hidden, weight and bias (backward
        only scales the stored gradients), and the detached [S] log-probs.
    """
    resolved = resolve_backend(backend, hidden.device, ("auto", "triton", "torch"))
    check_logprob_args(
        hidden, weight, targets, cu_seqlens, bias, temperature, softcap, resolved, check_targets
    )
    bounds = [int(b) for b in (cu_seqlens.tolist() if host_cu_seqlens is None else host_cu_seqlens)]
    num_seqs = len(bounds) - 1
    if len(bounds) != cu_seqlens.numel():
        raise ValueError(
            f"host_cu_seqlens has {len(bounds)} entries, cu_seqlens {cu_seqlens.numel()}"
        )
    if group_size < 1 or num_seqs % group_size:
        raise ValueError(f"{num_seqs} sequences do not form groups of group_size={group_size}")
    temperature, softcap = float(temperature), None if softcap is None else float(softcap)
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (hidden, weight, bias)
    )
    if not needs_grad:  # evaluation: nothing to fuse
        logps = sequence_logprobs(
            hidden, weight, targets, cu_seqlens, bias=bias, temperature=temperature,
            softcap=softcap, backend=resolved, check_targets=False,
        )  # fmt: skip
        return loss_fn(logps), logps
    v = weight.shape[0]
    if chunk_tokens is None:
        chunk_tokens = default_chunk_tokens(bounds, group_size, v, hidden.device.type)
    spec = FusedSpec(
        targets=targets,
        seq_id=sequence_ids(cu_seqlens, hidden.shape[0]),
        bounds=bounds,
        loss_fn=loss_fn,
        group_size=group_size,
        temperature=temperature,
        softcap=softcap,
        chunk_tokens=chunk_tokens,
        backend=resolved,
    )
    return FusedHeadLoss.apply(hidden, weight, bias, spec)
