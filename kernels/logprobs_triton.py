"""Triton per-sequence log-probs: fused LM head + log-softmax + target gather, never storing logits.

Forward: one program per (token block, vocab split). It walks its vocab tiles, computes each
[BLOCK_N, BLOCK_V] logits tile with tl.dot over BLOCK_D slices into an fp32 accumulator, and keeps
an online max / sum-exp and the target logit, all in fp32. Splits (partial max, sum-exp, target
logit per token) are merged in torch: O(splits * N) work.

Backward: per token chunk of C tokens, a kernel recomputes the logits tiles and writes
dlin = g_t * (onehot(target) - softmax(z)) * dz/dlin into a [C, V] workspace (fp32 for fp32
inputs, else the input dtype). Then cuBLAS/torch does dH[chunk] = ws @ W and
dW_fp32 += ws^T @ H[chunk]; dW is accumulated in fp32 across chunks (bf16 accumulation of dW
across chunks is a known divergence source).

Memory math (Llama-3-8B head, V = 128256, D = 4096, bf16): the workspace is capped at 64M elements
(128 MiB in bf16, C = 512 tokens), the fp32 dW accumulator is V*D*4 = 2.1 GB (a second, fp32 copy
of the weight gradient), plus 8 bytes per token for lse and g. The logits would be N*V*4 bytes
(8.4 GB at N = 16384).

Precision: for fp32 inputs the dots use input_precision="ieee" (Triton otherwise silently uses
TF32, 10-bit mantissas), which trades tensor-core speed for exact fp32; bf16/fp16 inputs use
tensor cores with fp32 accumulation. Under the CPU interpreter (TRITON_INTERPRET=1) tl.dot on
bf16/fp16 is computed wrongly by Triton 3.9, so operands are upcast to fp32 in the kernel there
(UPCAST).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

from common.constants import IGNORE_INDEX
from kernels.reference import PackedTargets, segment_sum


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tanh(x):
    # tanh from exp, stable for large |x| (interpreter and GPU alike; absolute error ~1 ulp).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    D,
    stride_h,
    stride_w,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 tile z[BLOCK_N, BLOCK_V] and, for the softcap chain rule, t = tanh(lin/(T*cap))."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        ds = d0 + tl.arange(0, BLOCK_D)
        d_ok = ds < D
        h = tl.load(
            h_ptr + rows[:, None] * stride_h + ds[None, :],
            mask=row_ok[:, None] & d_ok[None, :],
            other=0.0,
        )
        # W tile loaded transposed: [BLOCK_D, BLOCK_V].
        w = tl.load(
            w_ptr + cols[None, :] * stride_w + ds[:, None],
            mask=col_ok[None, :] & d_ok[:, None],
            other=0.0,
        )
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, w, acc, input_precision=DOT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(acc * (inv_temp / softcap))
        z = softcap * t
    else:
        t = acc  # unused
        z = acc * inv_temp
    return z, t


@triton.jit
def _logprobs_fwd_kernel(
    h_ptr,  # [N, D] hidden, row stride stride_h, unit column stride
    w_ptr,  # [V, D] weight, row stride stride_w
    b_ptr,  # [V] bias (only read if HAS_BIAS)
    tgt_ptr,  # [N] int64 targets, IGNORE_INDEX never used as an index
    max_ptr,  # [SPLITS, N] fp32 partial running max
    sum_ptr,  # [SPLITS, N] fp32 partial sum of exp(z - max)
    zt_ptr,  # [SPLITS, N] fp32 partial target logit (0 if the target is in another split)
    N,
    V,
    D,
    stride_h,
    stride_w,
    tiles_per_split,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    row_ok = rows < N
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-100)  # IGNORE_INDEX: matches no column

    m = tl.full((BLOCK_N,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_N,), dtype=tl.float32)
    zt = tl.zeros((BLOCK_N,), dtype=tl.float32)
    tile_start = split * tiles_per_split
    num_tiles = tl.cdiv(V, BLOCK_V)
    tile_end = tl.minimum(tile_start + tiles_per_split, num_tiles)
    for tile in range(tile_start, tile_end):
        cols = tile * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        z, _ = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
            inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION,
            BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # The target logit comes from the fp32 tile, never from rounded logits.
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        # Every tile has >= 1 valid column, so m_new is finite and no inf - inf appears.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sum_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)


@triton.jit
def _logprobs_bwd_kernel(
    h_ptr,  # [C, D] hidden rows of this chunk
    w_ptr,  # [V, D]
    b_ptr,  # [V]
    tgt_ptr,  # [C] int64
    lse_ptr,  # [C] fp32 log-sum-exp saved by the forward
    g_ptr,  # [C] fp32 upstream gradient per token (0 for ignored targets)
    ws_ptr,  # [C, V] workspace, row stride V: dlin in the workspace dtype
    C,
    V,
    D,
    stride_h,
    stride_w,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Token blocks vary fastest, so programs that run together share the same W tile in L2.
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok = rows < C
    col_ok = cols < V
    z, t = _logits_tile(
        h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
        inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION,
        BLOCK_N, BLOCK_V, BLOCK_D,
    )  # fmt: skip
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-100)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    p = tl.exp(z - lse[:, None])
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    dz = g[:, None] * (onehot - p)
    if HAS_SOFTCAP:
        dz = dz * (1.0 - t * t)
    dlin = dz * inv_temp
    ws = ws_ptr + rows[:, None] * V + cols[None, :]
    tl.store(ws, dlin.to(ws_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


# ---------------------------------------------------------------------------------------------
# Launch configuration
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TritonConfig:
    """Tile sizes. GPU defaults are reasonable starting points, not autotuned (no GPU was available
    when this was written); benchmark and adjust with `use_config`. The interpreter defaults are
    small so that CPU tests stay fast and cover ragged edges."""

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    num_splits: int | None = None  # vocab splits in forward; None = enough programs for the GPU
    max_workspace_elements: int = 64 * 2**20  # C*V cap of the backward workspace
    chunk_tokens: int | None = None  # explicit backward token chunk


INTERPRETER_CONFIG = TritonConfig(
    block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1, max_workspace_elements=2**16
)
_OVERRIDE: TritonConfig | None = None


def current_config(device: torch.device) -> TritonConfig:
    if _OVERRIDE is not None:
        return _OVERRIDE
    return INTERPRETER_CONFIG if device.type == "cpu" else TritonConfig()


@contextlib.contextmanager
def use_config(config: TritonConfig) -> Iterator[None]:
    """Temporarily use these tile sizes (tests, benchmarks, tuning)."""
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, config
    try:
        yield
    finally:
        _OVERRIDE = previous


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


def _kernel_flags(hidden: Tensor, bias: Tensor | None, packed: PackedTargets) -> dict:
    upcast = interpreting() and hidden.dtype != torch.float32
    return dict(
        inv_temp=1.0 / packed.temperature,
        softcap=1.0 if packed.softcap is None else float(packed.softcap),
        HAS_BIAS=bias is not None,
        HAS_SOFTCAP=packed.softcap is not None,
        UPCAST=upcast,
        # "ieee" keeps fp32 dots exact fp32; for bf16/fp16 operands the choice has no effect.
        DOT_PRECISION="ieee" if hidden.dtype == torch.float32 or upcast else "tf32",
    )


# ---------------------------------------------------------------------------------------------
# Host launchers
# ---------------------------------------------------------------------------------------------


def logprobs_forward(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedTargets
) -> tuple[Tensor, Tensor]:
    """Per-token log-prob (0 where ignored) and log-sum-exp, both fp32 [N]. Inputs contiguous."""
    n, d = hidden.shape
    v = weight.shape[0]
    cfg = current_config(hidden.device)
    splits, tiles_per_split = _num_splits(cfg, n, v, hidden.device)
    part = torch.empty(3, splits, n, dtype=torch.float32, device=hidden.device)
    if n > 0:
        grid = (triton.cdiv(n, cfg.block_n), splits)
        _logprobs_fwd_kernel[grid](
            hidden, weight, bias if bias is not None else hidden, packed.targets,
            part[0], part[1], part[2],
            n, v, d, hidden.stride(0), weight.stride(0), tiles_per_split,
            **_kernel_flags(hidden, bias, packed),
            BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    m, s, zt = part[0], part[1], part[2]
    m_all = m.amax(0)
    lse = m_all + torch.log((s * torch.exp(m - m_all)).sum(0))
    token_logp = torch.where(packed.targets != IGNORE_INDEX, zt.sum(0) - lse, 0.0)
    return token_logp, lse


_FUSED_DW_OK: dict[torch.device, bool] = {}


def _accumulate_dw(grad_w: Tensor, ws: Tensor, h: Tensor) -> None:
    """grad_w (fp32, [V, D]) += ws^T @ h, with fp32 accumulation across chunks.

    fp32 operands: one in-place addmm. Half operands on CUDA: cuBLAS with bf16 inputs and an fp32
    output/accumulator (torch's addmm `out_dtype` overload) in place. If this torch build refuses
    that call (it raises synchronously at dispatch), fall back to upcasting 8192-row vocab slices
    of the workspace, which bounds the temporary to 8192*C fp32 values.
    """
    if ws.dtype == grad_w.dtype:
        grad_w.addmm_(ws.t(), h)
        return
    if ws.is_cuda and _FUSED_DW_OK.get(ws.device, True):
        try:
            torch.addmm(grad_w, ws.t(), h, out_dtype=torch.float32, out=grad_w)
            return
        except (RuntimeError, NotImplementedError, TypeError):
            _FUSED_DW_OK[ws.device] = False
    h32 = h.float()
    for v0 in range(0, ws.shape[1], 8192):
        grad_w[v0 : v0 + 8192].addmm_(ws[:, v0 : v0 + 8192].t().float(), h32)


class TritonSequenceLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedTargets
    ) -> Tensor:
        hidden, weight = hidden.contiguous(), weight.contiguous()
        bias = bias.contiguous() if bias is not None else None
        token_logp, lse = logprobs_forward(hidden, weight, bias, packed)
        ctx.save_for_backward(hidden, weight, bias, lse)
        ctx.packed = packed
        return segment_sum(token_logp, packed.seq_id, packed.num_seqs)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        hidden, weight, bias, lse = ctx.saved_tensors
        packed: PackedTargets = ctx.packed
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, d = hidden.shape
        v = weight.shape[0]
        cfg = current_config(hidden.device)
        flags = _kernel_flags(hidden, bias, packed)

        valid = packed.targets != IGNORE_INDEX
        g_tok = torch.where(valid, grad_out.float()[packed.seq_id], 0.0)
        # Workspace: C tokens x V, C a multiple of BLOCK_N with C*V <= max_workspace_elements.
        chunk = cfg.chunk_tokens or max(
            cfg.block_n, cfg.max_workspace_elements // max(v, 1) // cfg.block_n * cfg.block_n
        )
        chunk = max(1, min(chunk, n))
        ws_dtype = torch.float32 if hidden.dtype == torch.float32 else hidden.dtype
        ws = torch.empty(chunk, v, dtype=ws_dtype, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(v, d, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(v, dtype=torch.float32, device=weight.device) if need_b else None
        for c0 in range(0, n, chunk):
            c1 = min(n, c0 + chunk)
            rows = c1 - c0
            w_chunk = ws[:rows]
            h = hidden[c0:c1]
            grid = (triton.cdiv(rows, cfg.block_n), triton.cdiv(v, cfg.block_v))
            _logprobs_bwd_kernel[grid](
                h, weight, bias if bias is not None else hidden, packed.targets[c0:c1],
                lse[c0:c1], g_tok[c0:c1], w_chunk,
                rows, v, d, hidden.stride(0), weight.stride(0),
                **flags,
                BLOCK_N=cfg.block_n, BLOCK_V=cfg.block_v, BLOCK_D=cfg.block_d,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            )  # fmt: skip
            if need_h:
                torch.mm(w_chunk, weight, out=grad_h[c0:c1])
            if need_w:
                _accumulate_dw(grad_w, w_chunk, h)
            if need_b:
                grad_b += w_chunk.sum(0, dtype=torch.float32)
        if need_w:
            grad_w = grad_w.to(weight.dtype)
        if need_b:
            grad_b = grad_b.to(bias.dtype)
        return grad_h, grad_w, grad_b, None


def triton_sequence_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, packed: PackedTargets
) -> Tensor:
    return TritonSequenceLogprobs.apply(hidden, weight, bias, packed)
