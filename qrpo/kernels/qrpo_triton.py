"""Fused QRPO loss in Triton: quantile counting, transform, residual and loss in one pass.

One program handles BLOCK_B rows and walks their K reference rewards in BLOCK_K tiles, counting
#less, #equal and #valid (mask and excluded column applied), then forms q, f(q), the residual and
the loss. Memory traffic is one read of ref_rewards (B*K values); nothing [B, K]-sized is written.

Decisions:
- beta * log Z is passed in per sample, computed by `qrpo.kernels.partition.row_log_partition` in
  float64 torch ops on the device (no sync), so both backends use the very same value for every
  partition form. The closed forms are O(B) work, the finite-K grid O(B * K) and the empirical
  form a sort per row; the `square` transform needs a 96-node quadrature; all are simpler and
  more exact in float64 torch than inside the kernel.
- The randomized estimator's U ~ Uniform(0, 1) is drawn by torch from the caller's generator, so
  both backends consume the same random stream.
- Rewards are compared in their own dtype (both cast to their promoted dtype on the host), so
  float64 rewards do not gain artificial ties by rounding to fp32.
- After counting, the per-row arithmetic (q, f(q), residual) is float64: O(B) work that keeps
  the triton path within float32 rounding of the float64 torch path for every beta and f.
- The normal inverse CDF is Acklam's rational approximation (relative error < 1.2e-9 in float64;
  fp32 evaluation would lose ~3e-5 to cancellation), since the interpreter lacks erfinv.
- The backward kernel computes grad_logps = grad_loss * dloss/dresidual * (-beta) from the saved
  residual; nothing is pre-scaled in the forward, so any upstream weighting is applied correctly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from qrpo.kernels.qrpo import ESTIMATORS, TRANSFORMS

# Acklam's rational approximation of the inverse normal CDF. Triton jit code cannot read
# non-constexpr module globals, so the published coefficients are written inline: central
# region a1..a6 / b1..b5 in r = (p - 1/2)^2, tails c1..c6 / d1..d4 in r = sqrt(-2 log p),
# break points p_low = 0.02425 and 1 - p_low.


@triton.jit
def _ndtri_tail(r):
    """Lower-tail branch in r = sqrt(-2 log p); the upper tail is its mirror image."""
    num = (
        ((((-7.784894002430293e-03 * r - 3.223964580411365e-01) * r - 2.400758277161838) * r
          - 2.549732539343734) * r + 4.374664141464968) * r + 2.938163982698783
    )  # fmt: skip
    den = (
        (((7.784695709041462e-03 * r + 3.224671290700398e-01) * r + 2.445134137142996) * r
         + 3.754408661907416) * r + 1.0
    )  # fmt: skip
    return num / den


@triton.jit
def _ndtri(p):
    """Phi^-1(p) for p in (0, 1); all three branches are finite there, then one is selected."""
    x = p - 0.5
    r = x * x
    num = (
        (((((-39.69683028665376 * r + 220.9460984245205) * r - 275.9285104469687) * r
           + 138.3577518672690) * r - 30.66479806614716) * r + 2.506628277459239) * x
    )  # fmt: skip
    den = (
        ((((-54.47609879822406 * r + 161.5858368580409) * r - 155.6989798598866) * r
          + 66.80131188771972) * r - 13.28068155288572) * r + 1.0
    )  # fmt: skip
    central = num / den
    lower = _ndtri_tail(tl.sqrt(-2.0 * tl.log(p)))
    upper = -_ndtri_tail(tl.sqrt(-2.0 * tl.log(1.0 - p)))
    return tl.where(p < 0.02425, lower, tl.where(p > 1.0 - 0.02425, upper, central))


@triton.jit(do_not_specialize=("B",))  # the batch size changes per micro-batch
def _qrpo_fwd_kernel(
    logps_ptr,  # [B] policy log-probs (any float dtype)
    ref_logps_ptr,  # [B] reference log-probs
    rewards_ptr,  # [B] rewards, same dtype as ref_rewards
    ref_ptr,  # [B, K] reference rewards, row stride stride_ref
    mask_ptr,  # [B, K] uint8 validity (only if HAS_MASK)
    exclude_ptr,  # [B] int64 column left out, -1 for none (only if HAS_EXCLUDE)
    u_ptr,  # [B] fp32 uniforms (only for ESTIMATOR == 2)
    beta_ptr,  # [B] float64
    blz_ptr,  # [B] float64 beta * log Z_f(beta), precomputed in torch
    sigma_ptr,  # [B] float (only for TRANSFORM == 3)
    loss_ptr,  # [B] fp32 out
    res_ptr,  # [B] fp32 out: residual (saved for backward)
    q_ptr,  # [B] fp32 out: quantile before clamping
    fq_ptr,  # [B] fp32 out: f(q)
    B,
    K,
    stride_ref,
    stride_mask,
    HAS_MASK: tl.constexpr,
    HAS_EXCLUDE: tl.constexpr,
    ESTIMATOR: tl.constexpr,  # 0 inclusive, 1 midrank, 2 randomized
    TRANSFORM: tl.constexpr,  # index into qrpo.kernels.qrpo.TRANSFORMS
    SQUARED: tl.constexpr,
    BLOCK_B: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    row_ok = rows < B
    r = tl.load(rewards_ptr + rows, mask=row_ok, other=0.0)
    if HAS_EXCLUDE:
        excl = tl.load(exclude_ptr + rows, mask=row_ok, other=-1)
    less = tl.zeros((BLOCK_B,), dtype=tl.int32)
    equal = tl.zeros((BLOCK_B,), dtype=tl.int32)
    kval = tl.zeros((BLOCK_B,), dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K).to(tl.int64)
        inside = row_ok[:, None] & (cols[None, :] < K)
        ref = tl.load(ref_ptr + rows[:, None] * stride_ref + cols[None, :], mask=inside, other=0.0)
        valid = inside
        if HAS_MASK:
            m = tl.load(
                mask_ptr + rows[:, None] * stride_mask + cols[None, :], mask=inside, other=0
            )
            valid = valid & (m != 0)
        if HAS_EXCLUDE:
            valid = valid & (cols[None, :] != excl[:, None])
        less += tl.sum((valid & (ref < r[:, None])).to(tl.int32), axis=1)
        equal += tl.sum((valid & (ref == r[:, None])).to(tl.int32), axis=1)
        kval += tl.sum(valid.to(tl.int32), axis=1)

    # Per-row scalars from here on are float64: O(B) work, and it keeps Acklam's rational
    # function free of fp32 cancellation (~3e-5 relative near p = 0.03 in fp32).
    lf = less.to(tl.float64)
    ef = equal.to(tl.float64)
    # Padding rows (beyond B) get K = 2 so that no 0/0 or log(0) is evaluated for them; a real
    # row with no valid reference reward still gives NaN, as in the torch path.
    kf = tl.where(row_ok, kval.to(tl.float64), 2.0)
    if ESTIMATOR == 0:
        q = (lf + ef) / kf
    elif ESTIMATOR == 1:
        q = (lf + 0.5 * ef) / kf
    else:
        u = tl.load(u_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
        q = (lf + u * ef) / kf

    if TRANSFORM == 0:
        fq = q
    elif TRANSFORM == 1:
        fq = tl.log(tl.maximum(q, 1.0 / kf))
    elif TRANSFORM == 2 or TRANSFORM == 3:
        qc = tl.minimum(tl.maximum(q, 1.0 / kf), (kf - 1.0) / kf)
        fq = _ndtri(qc)
        if TRANSFORM == 3:
            fq = fq * tl.load(sigma_ptr + rows, mask=row_ok, other=1.0).to(tl.float64)
    elif TRANSFORM == 4:
        fq = q * q
    else:
        fq = tl.sqrt(q)

    beta = tl.load(beta_ptr + rows, mask=row_ok, other=1.0)
    blz = tl.load(blz_ptr + rows, mask=row_ok, other=0.0)
    lp = tl.load(logps_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    ref_lp = tl.load(ref_logps_ptr + rows, mask=row_ok, other=0.0).to(tl.float64)
    residual = fq - blz - beta * (lp - ref_lp)
    if SQUARED:
        loss = residual * residual
    else:
        loss = tl.abs(residual)
    tl.store(loss_ptr + rows, loss.to(tl.float32), mask=row_ok)
    tl.store(res_ptr + rows, residual.to(tl.float32), mask=row_ok)
    tl.store(q_ptr + rows, q.to(tl.float32), mask=row_ok)
    tl.store(fq_ptr + rows, fq.to(tl.float32), mask=row_ok)


@triton.jit(do_not_specialize=("B",))
def _qrpo_bwd_kernel(
    grad_loss_ptr,  # [B] fp32 upstream gradient
    res_ptr,  # [B] fp32 residual saved by the forward
    beta_ptr,  # [B] fp32
    grad_logps_ptr,  # [B] fp32 out
    B,
    SQUARED: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_B + tl.arange(0, BLOCK_B).to(tl.int64)
    ok = rows < B
    g = tl.load(grad_loss_ptr + rows, mask=ok, other=0.0)
    res = tl.load(res_ptr + rows, mask=ok, other=0.0)
    beta = tl.load(beta_ptr + rows, mask=ok, other=0.0)
    if SQUARED:
        dres = 2.0 * res
    else:
        dres = tl.where(res > 0, 1.0, tl.where(res < 0, -1.0, 0.0))  # sign, 0 at 0 like torch
    tl.store(grad_logps_ptr + rows, -g * dres * beta, mask=ok)


_BLOCK_B = 16


@dataclass(frozen=True)
class QRPOBatch:
    """Everything the loss reads besides `logps`: constants of the regression (no gradient)."""

    ref_logps: Tensor  # [B]
    rewards: Tensor  # [B]
    ref_rewards: Tensor  # [B, K]
    ref_mask: Tensor | None  # [B, K] bool
    exclude_index: Tensor | None  # [B] int, -1 for none
    uniform: Tensor | None  # [B] fp32, randomized estimator only
    beta: Tensor  # [B] float64
    beta_logz: Tensor  # [B] float64, beta * log Z_f(beta)
    sigma: Tensor | None  # [B]
    transform: str
    estimator: str
    loss_type: str


class TritonQRPOLoss(torch.autograd.Function):
    """loss [B] from the fused kernel; residual, q and f(q) ride along as non-differentiable
    outputs so the stats cost nothing extra."""

    @staticmethod
    def forward(ctx, logps: Tensor, batch: QRPOBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        b, k = batch.ref_rewards.shape
        common = torch.promote_types(batch.rewards.dtype, batch.ref_rewards.dtype)
        rewards = batch.rewards.to(common).contiguous()
        ref_rewards = batch.ref_rewards.to(common)
        if ref_rewards.stride(1) != 1:
            ref_rewards = ref_rewards.contiguous()
        mask = batch.ref_mask
        mask = mask.to(torch.uint8).contiguous() if mask is not None else None
        excl = batch.exclude_index
        excl = excl.to(torch.int64).contiguous() if excl is not None else None
        beta64 = batch.beta.to(torch.float64).contiguous()
        out = torch.empty(4, b, dtype=torch.float32, device=logps.device)
        dummy = beta64  # stands in for absent optional pointers; never read
        if b > 0:
            _qrpo_fwd_kernel[(triton.cdiv(b, _BLOCK_B),)](
                logps.contiguous(), batch.ref_logps.detach().contiguous(), rewards, ref_rewards,
                mask if mask is not None else dummy,
                excl if excl is not None else dummy,
                batch.uniform.contiguous() if batch.uniform is not None else dummy,
                beta64, batch.beta_logz.to(torch.float64).contiguous(),
                batch.sigma.contiguous() if batch.sigma is not None else dummy,
                out[0], out[1], out[2], out[3],
                b, k, ref_rewards.stride(0), mask.stride(0) if mask is not None else 0,
                HAS_MASK=mask is not None,
                HAS_EXCLUDE=excl is not None,
                ESTIMATOR=ESTIMATORS.index(batch.estimator),
                TRANSFORM=TRANSFORMS.index(batch.transform),
                SQUARED=batch.loss_type == "squared",
                BLOCK_B=_BLOCK_B,
                BLOCK_K=min(128, triton.next_power_of_2(max(k, 16))),
            )  # fmt: skip
        loss, residual, q, fq = out.unbind(0)
        ctx.save_for_backward(residual, beta64.float())
        ctx.squared = batch.loss_type == "squared"
        ctx.logps_dtype = logps.dtype
        ctx.mark_non_differentiable(residual, q, fq)
        return loss, residual, q, fq

    @staticmethod
    def backward(ctx, grad_loss: Tensor, *_unused: Tensor) -> tuple[Tensor | None, None]:
        residual, beta = ctx.saved_tensors
        b = residual.shape[0]
        grad = torch.empty_like(residual)
        if b > 0:
            _qrpo_bwd_kernel[(triton.cdiv(b, _BLOCK_B),)](
                grad_loss.float().contiguous(), residual, beta, grad, b,
                SQUARED=ctx.squared, BLOCK_B=_BLOCK_B,
            )  # fmt: skip
        return grad.to(ctx.logps_dtype), None
