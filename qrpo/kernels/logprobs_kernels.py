"""Triton kernels of the per-sequence log-probs (launched from qrpo/kernels/logprobs_triton.py, whose
docstring explains the schedule, the memory bounds and the precision choices).

Pointers and constexprs are listed in each kernel's signature comments. Offsets are int64 (N*V
exceeds 2^31 at 16k tokens x 128k vocabulary).
"""

import triton
import triton.language as tl

# Triton compiles one variant per pattern of integer arguments (== 1, divisible by 16, other) and
# of pointer alignment (16 bytes or not). Token counts and chunk offsets change with every
# micro-batch, so specializing on them recompiled the kernels mid-run (a 3.7 s step among 0.44 s
# ones on the H200). These arguments are left general. The model's dims and strides and the
# tile-wide pointers (hidden, weight, logits, workspace: offsets that are multiples of a row)
# stay specialized; the per-token vectors are one value per row, where the hint buys little.
FWD_PER_BATCH_INTS = ("N", "tiles_per_split")
FWD_PER_BATCH_POINTERS = ("tgt_ptr", "max_ptr", "sum_ptr", "zt_ptr")
BWD_PER_BATCH_INTS = ("C", "v_start", "v_end")
BWD_PER_BATCH_POINTERS = ("tgt_ptr", "lse_ptr", "g_ptr")


@triton.jit
def _tanh(x):
    # tanh from exp, stable for large |x| (interpreter and GPU alike; absolute error ~1 ulp).
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _slice_dot(
    h_ptr, w_ptr, rows, cols, row_ok, col_ok, d0, D, stride_h, stride_w, acc,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """acc + h[rows, d0:d0+BLOCK_D] @ w[cols, d0:d0+BLOCK_D]^T, chained in the dot's accumulator."""
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
    return tl.dot(h, w, acc, input_precision=DOT_PRECISION)


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
    PROMOTE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 tile z[BLOCK_N, BLOCK_V] and, for the softcap chain rule, t = tanh(lin/(T*cap)).

    PROMOTE == 1: every BLOCK_D slice chained in one tensor-core accumulator. PROMOTE > 1: each
    group of PROMOTE slices is summed in its own accumulator, then added to `acc` with
    round-to-nearest fp32 adds (qrpo/kernels/logprobs_triton.py, Precision)."""
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    if PROMOTE == 1:
        for d0 in range(0, D, BLOCK_D):
            acc = _slice_dot(
                h_ptr, w_ptr, rows, cols, row_ok, col_ok, d0, D, stride_h, stride_w, acc,
                UPCAST, DOT_PRECISION, BLOCK_D,
            )  # fmt: skip
    else:
        for d0 in range(0, D, BLOCK_D * PROMOTE):
            part = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
            for k in tl.static_range(PROMOTE):
                part = _slice_dot(
                    h_ptr, w_ptr, rows, cols, row_ok, col_ok, d0 + k * BLOCK_D, D, stride_h,
                    stride_w, part, UPCAST, DOT_PRECISION, BLOCK_D,
                )  # fmt: skip
            acc += part
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_SOFTCAP:
        t = _tanh(acc * (inv_temp / softcap))
        z = softcap * t
    else:
        t = acc  # unused
        z = acc * inv_temp
    return z, t


@triton.jit(
    do_not_specialize=FWD_PER_BATCH_INTS, do_not_specialize_on_alignment=FWD_PER_BATCH_POINTERS
)
def _logprobs_fwd_kernel(
    h_ptr,  # [N, D] hidden, row stride stride_h, unit column stride
    w_ptr,  # [V, D] weight, row stride stride_w
    b_ptr,  # [V] bias (only read if HAS_BIAS)
    tgt_ptr,  # [N] int64 targets, IGNORE_INDEX never used as an index
    max_ptr,  # [SPLITS, N] fp32 partial running max
    sum_ptr,  # [SPLITS, N] fp32 partial sum of exp(z - max)
    zt_ptr,  # [SPLITS, N] fp32 partial target logit (0 if the target is in another split)
    z_ptr,  # [N, V] fp32 logits, row stride V (only written if STORE_Z)
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
    PROMOTE: tl.constexpr,
    STORE_Z: tl.constexpr,
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
            inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, PROMOTE,
            BLOCK_N, BLOCK_V, BLOCK_D,
        )  # fmt: skip
        if STORE_Z:
            z_out = z_ptr + rows[:, None] * V + cols[None, :]
            tl.store(z_out, z, mask=row_ok[:, None] & col_ok[None, :])
        z = tl.where(col_ok[None, :], z, float("-inf"))
        # The target logit comes from the same fp32 tile as the log-sum-exp, never from a
        # rounded copy of the logits.
        zt += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
        # Every tile has >= 1 valid column, so m_new is finite and no inf - inf appears.
        m_new = tl.maximum(m, tl.max(z, axis=1))
        s = s * tl.exp(m - m_new) + tl.sum(tl.exp(z - m_new[:, None]), axis=1)
        m = m_new
    out = split * N + rows
    tl.store(max_ptr + out, m, mask=row_ok)
    tl.store(sum_ptr + out, s, mask=row_ok)
    tl.store(zt_ptr + out, zt, mask=row_ok)


@triton.jit(
    do_not_specialize=BWD_PER_BATCH_INTS, do_not_specialize_on_alignment=BWD_PER_BATCH_POINTERS
)
def _logprobs_bwd_kernel(
    h_ptr,  # [C, D] hidden rows of this chunk (unused with LOAD_Z)
    w_ptr,  # [V, D] (unused with LOAD_Z)
    b_ptr,  # [V]
    z_ptr,  # [C, V] fp32 logits stored by the forward, row stride V (only read with LOAD_Z)
    tgt_ptr,  # [C] int64
    lse_ptr,  # [C] fp32 log-sum-exp saved by the forward
    g_ptr,  # [C] fp32 upstream gradient per token (0 for ignored targets)
    ws_ptr,  # [C, ws_stride] workspace: dlin of vocab columns [v_start, v_end) in its dtype
    C,
    V,
    D,
    v_start,
    v_end,
    ws_stride,
    stride_h,
    stride_w,
    inv_temp,
    softcap,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    PROMOTE: tl.constexpr,
    LOAD_Z: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # Token blocks vary fastest, so programs that run together share the same W tile in L2.
    pid_n = tl.program_id(0).to(tl.int64)
    pid_v = tl.program_id(1).to(tl.int64)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cols = v_start + pid_v * BLOCK_V + tl.arange(0, BLOCK_V).to(tl.int64)
    row_ok = rows < C
    col_ok = cols < v_end
    if LOAD_Z:
        z = tl.load(
            z_ptr + rows[:, None] * V + cols[None, :], mask=row_ok[:, None] & col_ok[None, :]
        )
        t = z / softcap  # tanh(lin / (T cap)), recovered from z = cap * t
    else:
        z, t = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w,
            inv_temp, softcap, HAS_BIAS, HAS_SOFTCAP, UPCAST, DOT_PRECISION, PROMOTE,
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
    ws = ws_ptr + rows[:, None] * ws_stride + (cols - v_start)[None, :]
    tl.store(ws, dlin.to(ws_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])
