"""Triton per-sequence log-probs: fused LM head + log-softmax + target gather, never storing logits.

Forward: one program per (token block, vocab split). It walks its vocab tiles, computes each
[BLOCK_N, BLOCK_V] logits tile with tl.dot over BLOCK_D slices into an fp32 accumulator, and keeps
an online max / sum-exp and the target logit, all in fp32. Splits (partial max, sum-exp, target
logit per token) are merged in torch: O(splits * N) work. With STORE_Z (the fused head+loss pass,
qrpo/kernels/fused_head.py) the fp32 logits tile is also written to a [C, V] buffer.

Backward, vocabulary slices outermost: for each slice of Vs vocabulary rows, and each token chunk
of C rows (C = N when N*Vs fits the workspace, the usual case), a kernel recomputes the logits
tiles (or reads them back with LOAD_Z) and writes dlin = g_t * (onehot(target) - softmax(z)) *
dz/dlin into a [C, Vs] workspace in the input dtype. cuBLAS then does dH_fp32 += ws @ W_slice and
dW_slice_fp32 (+)= ws^T @ H_chunk, both with fp32 accumulation; a finished dW slice is written
once in the weight's dtype. No [V, D] fp32 buffer exists: dW is summed over all tokens in fp32
inside one GEMM (K = N) or in the [Vs, D] fp32 slice buffer across token chunks, never in bf16.

Memory math (Llama-3-8B head, V = 128256, D = 4096, bf16, N = 16384): workspace <= 48M elements
(Vs = 3072: 101 MB), fp32 dH 268 MB, fp32 dW slice 50 MB: ~0.42 GB beyond inputs and gradients,
against 2.1 GB for a [V, D] fp32 accumulator and 8.4 GB for fp32 logits. Every logits tile is
computed twice (forward and backward), so forward+backward is 4 GEMM units.

Precision:
- fp32 inputs use input_precision="ieee" (Triton otherwise silently uses TF32); bf16/fp16 use
  tensor cores with fp32 accumulation.
- Tensor-core accumulation is not round-to-nearest fp32: it truncates when aligning and
  normalising the sum (Fasi et al. 2021, "Numerical behavior of NVIDIA tensor cores"), so chaining
  all D/BLOCK_D slices in one tensor-core accumulator biases every logit slightly toward zero. The
  biggest logits dominate the log-sum-exp, so the bias does not average out over a sequence: it
  adds up over its tokens. With `promote_every` = k > 1 the tile loop sums k slices in a fresh
  accumulator and adds that partial to the tile's fp32 accumulator with ordinary round-to-nearest
  adds (the promotion DeepSeek-V3 uses for FP8, arXiv 2412.19437 section 3.3.2). A single-slice
  partial would be folded back by Triton (`acc + dot(a, b)` becomes `dot(a, b, acc)`), so a
  promoted partial spans >= 2 slices. It costs a second fp32 tile accumulator in registers, so
  the tile table decides per configuration (qrpo/kernels/tiles.py); the benchmark measures both.
- The per-sequence sum of token log-probs is taken in float64 (qrpo.kernels.segments.segment_sum):
  in fp32, adding ~1000 terms of ~-14 to a running total of ~-12,000 (ulp 1e-3) costs ~0.01 nats.
- Under the CPU interpreter (TRITON_INTERPRET=1) tl.dot on bf16/fp16 is computed wrongly by
  Triton 3.9, so operands are upcast to fp32 in the kernel there (UPCAST).
"""

from __future__ import annotations

import torch
import triton
from torch import Tensor

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels.logprobs_kernels import _logprobs_bwd_kernel, _logprobs_fwd_kernel
from qrpo.kernels.segments import PackedTargets, segment_sum
from qrpo.kernels.tiles import (  # noqa: F401  (re-exported: tests and benchmarks import them here)
    INTERPRETER_CONFIG,
    TritonConfig,
    current_config,
    interpreting,
    use_config,
)

# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


def config_for(hidden: Tensor, weight: Tensor) -> TritonConfig:
    return current_config(hidden.device, hidden.dtype, hidden.shape[1], weight.shape[0])


def _num_splits(cfg: TritonConfig, n: int, v: int, device: torch.device) -> tuple[int, int]:
    """(splits, tiles per split): split the vocab when token blocks alone underfill the GPU."""
    num_tiles = triton.cdiv(v, cfg.block_v)
    if cfg.num_splits is not None:
        wanted = cfg.num_splits
    elif device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        wanted = triton.cdiv(2 * sms, triton.cdiv(n, cfg.block_n))
    else:
        wanted = 1
    tiles_per_split = triton.cdiv(num_tiles, max(1, min(wanted, num_tiles)))
    return triton.cdiv(num_tiles, tiles_per_split), tiles_per_split


def kernel_flags(
    hidden: Tensor, bias: Tensor | None, temperature: float, softcap: float | None, cfg
) -> dict:
    upcast = interpreting() and hidden.dtype != torch.float32
    return dict(
        inv_temp=1.0 / temperature,
        softcap=1.0 if softcap is None else float(softcap),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=softcap is not None,
        UPCAST=upcast,
        # "ieee" keeps fp32 dots exact fp32; for bf16/fp16 operands the choice has no effect.
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 or upcast else "tf32",
        # Promotion matters for tensor-core sums only; fp32 "ieee" dots already round to nearest.
        # (Interpreted half inputs keep it, so that the CPU tests run its code path.)
        PROMOTE=1 if hidden.dtype == torch.float32 else max(1, cfg.promote_every),
    )


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------


def logprobs_forward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    temperature: float,
    softcap: float | None,
    z_out: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token log-prob (0 where ignored) and log-sum-exp, both fp32 [N]. Inputs contiguous.
    With `z_out` ([N, V] fp32, contiguous) the fp32 logits are stored there as well."""
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = config_for(hidden, weight)
    splits, tiles_per_split = _num_splits(cfg, n, v, hidden.device)
    part = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        grid = (triton.cdiv(n, cfg.block_n), splits)
        _logprobs_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, targets,
            part[0], part[1], part[2], z_out if z_out is not None else part,
            n, v, d, hidden.stride(0), weight.stride(0), tiles_per_split,
            **kernel_flags(hidden, bias, temperature, softcap, cfg), STORE_Z=z_out is not None,
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    m, s, zt = part[0], part[1], part[2]
    m_all = m.amax(0)
    lse = m_all + torch.log((s * torch.exp(m - m_all)).sum(0))
    token_logp = torch.where(targets != IGNORE_INDEX, zt.sum(0) - lse, 0.0)
    return token_logp, lse


_OUT_DTYPE_OK: dict[torch.device, bool] = {}


def mm_fp32(out: Tensor, a: Tensor, b: Tensor, accumulate: bool) -> None:
    """out (fp32) = a @ b, or out += a @ b, with fp32 accumulation for any operand dtype.

    fp32 operands: one mm/addmm. Half operands: cuBLAS with half inputs and an fp32 output (torch's
    mm/addmm `out_dtype` overloads). Where this torch build refuses that call (it raises at
    dispatch, before any work), each product is taken in the operands' dtype (fp32 accumulation
    inside the GEMM, rounded once) in row blocks and summed into `out` in fp32: sums across
    slices and chunks stay fp32, at tensor-core speed, with 4M-element temporaries.
    """
    if a.dtype == torch.float32:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
        return
    if _OUT_DTYPE_OK.get(a.device, True):
        try:
            if accumulate:
                torch.addmm(out, a, b, out_dtype=torch.float32, out=out)
            else:
                torch.mm(a, b, out_dtype=torch.float32, out=out)
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _OUT_DTYPE_OK[a.device] = False
    step = max(1, 2**22 // max(b.shape[1], 1))
    for r0 in range(0, a.shape[0], step):
        part = torch.mm(a[r0 : r0 + step], b)
        if accumulate:
            out[r0 : r0 + step] += part
        else:
            out[r0 : r0 + step].copy_(part)


def backward_plan(cfg: TritonConfig, n: int, v: int, d: int) -> tuple[int, int]:
    """(token chunk C, vocab slice Vs) of the backward: C * Vs <= the workspace bound, and the
    [Vs, D] fp32 dW slice buffer <= half of it.

    All N tokens in one chunk when that leaves a vocab slice of >= 8 tiles (then each dW slice is
    one GEMM over K = N tokens); otherwise 8-tile slices and as many tokens as fit."""
    cap = cfg.max_workspace_elements
    min_slice = min(v, 8 * cfg.block_v)
    if cfg.vocab_slice is not None:
        v_slice = min(v, cfg.vocab_slice)
    else:
        fit = min(cap // max(n, 1), cap // 2 // max(d, 1)) // cfg.block_v * cfg.block_v
        v_slice = min(v, max(min_slice, fit))
    chunk = cfg.chunk_tokens or max(cfg.block_n, cap // v_slice // cfg.block_n * cfg.block_n)
    return max(1, min(chunk, n)), max(1, v_slice)


def stored_logits_slice(cfg: TritonConfig, n: int, v: int) -> int:
    """The vocab slice of a backward that reads the forward's stored [n, V] logits (the fused
    pass: all n rows are one chunk): as wide as the workspace bound allows, in whole tiles.

    Whole tiles: n is a chunk of whole sequences (2,000 tokens for a pair of 1,000-token
    sequences), so bound // n is any number, and a slice of 25,165 columns leaves a partial tile
    at every slice's end."""
    if cfg.vocab_slice is not None:
        return min(v, cfg.vocab_slice)
    fit = cfg.max_workspace_elements // max(n, 1) // cfg.block_v * cfg.block_v
    return min(v, max(cfg.block_v, fit))


# Row stride of the backward's dlin workspace, in elements: a multiple of 64 (128 bytes in bf16),
# whatever the slice width. cuBLAS runs the dH and dW GEMMs on that workspace as a strided
# matrix, and with half inputs its tensor-core kernels need a leading dimension that is a
# multiple of 16 bytes; an odd width (25,165) sends both GEMMs to slow kernels.
WORKSPACE_ALIGN = 64


def workspace_stride(v_slice: int) -> int:
    return -(-v_slice // WORKSPACE_ALIGN) * WORKSPACE_ALIGN


def head_backward(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    targets: Tensor,
    lse: Tensor,
    g_tok: Tensor,
    temperature: float,
    softcap: float | None,
    *,
    dh_acc: Tensor | None,
    dw_out: Tensor | None = None,
    dw_acc: Tensor | None = None,
    db_acc: Tensor | None = None,
    z: Tensor | None = None,
) -> None:
    """Gradient of sum_t g_t * logp_t w.r.t. hidden, weight and bias, vocabulary slices outermost.

    dh_acc:  [N, D] fp32, += dlin @ W (None: not needed).
    dw_out:  [V, D] in the weight's dtype, each vocab slice written once, finished in fp32.
    dw_acc:  [V, D] fp32, += dlin^T @ H (the fused pass accumulates over its chunks here instead).
    db_acc:  [V] fp32, += column sums of dlin.
    z:       [N, V] fp32 logits stored by the forward; when given they are read, not recomputed.
    """
    n, d = hidden.shape
    v = weight.shape[0]
    if n == 0:  # no token: the loops below would not run, and dw_out must still be written
        if dw_out is not None:
            dw_out.zero_()
        return
    cfg = config_for(hidden, weight)
    flags = kernel_flags(hidden, bias, temperature, softcap, cfg)
    if z is None:
        chunk, v_slice = backward_plan(cfg, n, v, d)
    else:  # the stored logits are this call's rows: one chunk, the workspace bounds the slice
        chunk, v_slice = n, stored_logits_slice(cfg, n, v)
    ws_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
    ws_stride = workspace_stride(v_slice)
    ws = torch.empty(chunk, ws_stride, dtype=ws_dtype, device=hidden.device)
    # A finished half-precision dW slice is summed in this fp32 buffer, then rounded once.
    slice_acc = None
    if dw_out is not None and dw_out.dtype != torch.float32:
        slice_acc = torch.empty(v_slice, d, dtype=torch.float32, device=hidden.device)
    for v0 in range(0, v, v_slice):
        v1 = min(v, v0 + v_slice)
        w_slice = weight[v0:v1]
        if dw_acc is not None:
            dw_target = dw_acc[v0:v1]
        elif dw_out is not None:
            dw_target = dw_out[v0:v1] if slice_acc is None else slice_acc[: v1 - v0]
        else:
            dw_target = None
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            rows = c1 - c0
            dlin = ws[:rows, : v1 - v0]
            h = hidden[c0:c1]
            grid = (triton.cdiv(rows, cfg.block_n), triton.cdiv(v1 - v0, cfg.block_v))
            _logprobs_bwd_kernel[grid](
                h, weight, bias if bias is not None else hidden,
                z[c0:c1] if z is not None else lse, targets[c0:c1], lse[c0:c1], g_tok[c0:c1], dlin,
                rows, v, d, v0, v1, ws_stride, hidden.stride(0), weight.stride(0),
                **flags, LOAD_Z=z is not None,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            if dh_acc is not None:
                mm_fp32(dh_acc[c0:c1], dlin, w_slice, accumulate=True)
            if dw_target is not None:
                mm_fp32(dw_target, dlin.t(), h, accumulate=dw_acc is not None or c0 > 0)
            if db_acc is not None:
                db_acc[v0:v1] += dlin.sum(0, dtype=torch.float32)
        if slice_acc is not None:
            dw_out[v0:v1].copy_(dw_target)


class TritonSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedTargets
    ) -> Tensor:
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        token_logp, lse = logprobs_forward(
            hidden, weight, bias, packed.targets, packed.temperature, packed.softcap
        )
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.packed = packed
        return segment_sum(token_logp, packed.seq_id, packed.num_seqs)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, lse = ctx.saved_tensors
        packed: PackedTargets = ctx.packed
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        valid = packed.targets != IGNORE_INDEX
        g_tok = torch.where(valid, grad_out.float()[packed.seq_id], 0.0)
        fp32 = torch.float32
        # dH is summed over vocab slices in fp32: in place for fp32 inputs, else a [N, D] buffer.
        dh_acc = None
        if need_h:
            dh_acc = torch.zeros(hidden.shape, dtype=fp32, device=hidden.device)
        grad_w = torch.empty_like(weight) if need_w else None
        grad_b = torch.zeros(weight.shape[0], dtype=fp32, device=weight.device) if need_b else None
        head_backward(
            hidden, weight, bias, packed.targets, lse, g_tok, packed.temperature, packed.softcap,
            dh_acc=dh_acc, dw_out=grad_w, db_acc=grad_b,
        )  # fmt: skip
        grad_h = dh_acc.to(hidden.dtype) if need_h else None
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None


def triton_sequence_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedTargets
) -> Tensor:
    return TritonSequenceLogprobs.apply(hidden, weight, bias, packed)
