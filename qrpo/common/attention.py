"""Attention over packed rows at the cost of the sequences, never of the row.

A packed micro-batch is one row `[1, T]` of concatenated sequences. transformers' sdpa and eager
paths keep the sequences apart with a block-diagonal `[T, T]` mask, so they pay for the whole
T x T square: 16 times the work of 16 sequences of T/16. The paths here pay only for the
sequences' own squares:

- `flash_attention_2`: flash-attn's varlen kernel (when the package is installed), fed the
  micro-batch's `cu_seqlens` through transformers' flash kwargs, so it never infers them.
- `torch_varlen`: PyTorch's own flash kernels, `torch.nn.attention.varlen.varlen_attn`
  (torch >= 2.10, CUDA, bf16/fp16), registered here as a transformers attention implementation.
- `per_sequence`: everywhere else (CPU, older torch, fp32 on CUDA): the row's sequences are
  grouped into buckets of similar length, padded at their ends to the bucket's longest, and run
  through causal sdpa as a batch; the cost grows with the sum of squared lengths. Padding sits
  after a sequence's last token, where a causal query never looks, so no mask is needed.

`sdpa` and `eager` stay available (forced through `model.attn_implementation`) as transformers'
dense masked paths. The two paths registered here fall back to transformers' sdpa when a call
carries no packing (generation with a KV cache and padding masks, a plain forward), so a model
loaded with them still generates correctly.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

ATTN_IMPLEMENTATIONS = (
    "auto",
    "flash_attention_2",
    "torch_varlen",
    "per_sequence",
    "sdpa",
    "eager",
)
PACKED_PATHS = ("flash_attention_2", "torch_varlen", "per_sequence")

# A bucket holds sequences at least this fraction of its longest one: padding then costs at
# most (1/0.8)^2 = 1.56x a sequence's own square, and a row of lengths 1..1000 needs ~31 buckets.
BUCKET_RATIO = 0.8


def torch_varlen_available() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def choose_attention(requested: str, device: torch.device) -> tuple[str, str]:
    """The attention implementation for `model.attn_implementation=requested`, and why."""
    if requested != "auto":
        return requested, "set by model.attn_implementation"
    if device.type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2", "CUDA with flash-attn installed"
    if device.type == "cuda" and torch_varlen_available():
        failure = varlen_probe_failure(device)
        if failure is None:
            return "torch_varlen", "CUDA without flash-attn; torch ships varlen_attn"
        why = f"torch {torch.__version__}'s varlen_attn failed a probe ({failure})"
    else:
        why = (
            "no CUDA" if device.type != "cuda" else f"torch {torch.__version__} has no varlen_attn"
        )
    return "per_sequence", f"{why}: length-bucketed causal sdpa per sequence"


@functools.cache
def varlen_probe_failure(device: torch.device) -> str | None:
    """None when varlen_attn, called as `torch_varlen_attention` calls it, matches causal sdpa
    on two packed grouped-query sequences, forward and backward; else what went wrong. Its
    keywords changed between torch releases, so `auto` checks before a run depends on it."""
    g = torch.Generator(device="cpu").manual_seed(0)
    lengths, heads, kv_heads, dim = (21, 16), 4, 2, 64

    def rand(h: int) -> torch.Tensor:
        x = torch.randn(sum(lengths), h, dim, generator=g).to(device, torch.bfloat16)
        return x.requires_grad_()

    try:
        q, k, v = rand(heads), rand(kv_heads), rand(kv_heads)
        cu = torch.tensor([0, lengths[0], sum(lengths)], device=device, dtype=torch.int32)
        out = torch_varlen_attention(
            None, *(x.transpose(0, 1)[None] for x in (q, k, v)), None, scaling=dim**-0.5,
            cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max(lengths),
            max_length_k=max(lengths),
        )[0][0]  # fmt: skip
        out.float().square().sum().backward()
    except Exception as e:  # any failure means: do not pick this path
        return f"{type(e).__name__}: {e}"[:200]
    grads = [x.grad.float() for x in (q, k, v)]
    for x in (q, k, v):
        x.grad = None
    ref_out = []
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (x[a:b].float().transpose(0, 1) for x in (q, k, v))
        ks, vs = (x.repeat_interleave(heads // kv_heads, dim=0) for x in (ks, vs))
        ref_out.append(F.scaled_dot_product_attention(qs, ks, vs, is_causal=True).transpose(0, 1))
    ref = torch.cat(ref_out)
    ref.square().sum().backward()
    pairs = [("output", out.float(), ref)] + [
        (name, got, x.grad.float()) for name, got, x in zip("qkv", grads, (q, k, v))
    ]
    for name, got, want in pairs:
        err = ((got - want).norm() / want.norm().clamp_min(1e-12)).item()
        if not err < 2e-2:
            return f"{name} differs from causal sdpa: relative error {err:.3g}"
    return None


# --------------------------------------------------------------------------- the packing plan


@dataclass
class BucketPlan:
    """Where each bucket's padded `[n, L]` block reads its tokens from in the packed row
    (`gather[b]`), and where each packed token finds its output among the buckets' outputs
    flattened and concatenated (`scatter`, `[T]`)."""

    gather: list[torch.Tensor]
    scatter: torch.Tensor


def bucket_plan(cu_seqlens: list[int], device, ratio: float = BUCKET_RATIO) -> BucketPlan:
    """Group the row's sequences by length (longest first). Pad positions repeat a sequence's
    last token: they come after every real query's keys, so causal attention never reads them."""
    starts, lengths = cu_seqlens[:-1], [b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:])]
    order = sorted((i for i in range(len(lengths)) if lengths[i] > 0), key=lambda i: -lengths[i])
    gather, scatter = [], torch.empty(cu_seqlens[-1], dtype=torch.long)
    offset, k = 0, 0
    while k < len(order):
        longest = lengths[order[k]]
        members = []
        while k < len(order) and lengths[order[k]] >= ratio * longest:
            members.append(order[k])
            k += 1
        pos = torch.arange(longest)
        rows = []
        for r, s in enumerate(members):
            n = lengths[s]
            rows.append(starts[s] + pos.clamp(max=n - 1))
            scatter[starts[s] : starts[s] + n] = offset + r * longest + pos[:n]
        gather.append(torch.stack(rows).to(device, non_blocking=True))
        offset += len(members) * longest
    return BucketPlan(gather, scatter.to(device, non_blocking=True))


def packing_kwargs(implementation: str, cu_seqlens: torch.Tensor, max_seqlen: int) -> dict:
    """The keyword arguments that carry a packed row's boundaries to its attention path.
    flash-attn and varlen_attn read transformers' flash kwargs; per_sequence reads its plan,
    built from the boundaries on the host (free on CPU; one small copy on CUDA)."""
    if implementation in ("flash_attention_2", "torch_varlen"):
        return {
            "cu_seq_lens_q": cu_seqlens,
            "cu_seq_lens_k": cu_seqlens,
            "max_length_q": max_seqlen,
            "max_length_k": max_seqlen,
        }
    if implementation == "per_sequence":
        return {"bucket_plan": bucket_plan(cu_seqlens.tolist(), cu_seqlens.device)}
    return {}  # sdpa / eager: transformers builds the dense packed mask from position_ids


# --------------------------------------------------------------------------- the attention functions
# transformers' contract: query [B, H, T, d], key/value [B, Hkv, T, d] -> ([B, T, H, d], weights)


def per_sequence_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    plan: BucketPlan | None = kwargs.get("bucket_plan")
    if plan is None:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    heads, kv_heads = query.shape[1], key.shape[1]
    outs = []
    for index in plan.gather:
        n, length = index.shape
        # [1, H, T, d] -> the bucket's padded block [n, H, L, d]
        q, k, v = (
            x[0].index_select(1, index.reshape(-1)).unflatten(1, (n, length)).transpose(0, 1)
            for x in (query, key, value)
        )
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            is_causal=True,
            scale=scaling,
            dropout_p=dropout if module.training else 0.0,
            enable_gqa=kv_heads != heads,
        )
        outs.append(out.transpose(1, 2).reshape(n * length, heads, out.shape[-1]))
    return torch.cat(outs).index_select(0, plan.scatter)[None], None


def torch_varlen_attention(
    module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs
):
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        return _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs)
    if not _varlen_kernel_usable(query):
        # varlen_attn's flash kernels need CUDA and half precision (an fp32 run on CUDA).
        _warn_once(f"torch_varlen: {query.dtype} on {query.device.type}: per_sequence instead")
        plan = bucket_plan(cu.tolist(), cu.device)
        return per_sequence_attention(
            module, query, key, value, None, scaling, dropout, bucket_plan=plan
        )
    q, k, v = (x[0].transpose(0, 1) for x in (query, key, value))  # [T, H, d]
    options = _varlen_options(scaling)
    if k.shape[1] != q.shape[1] and "enable_gqa" not in options:
        k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    out = _varlen_attn()(
        q,
        k,
        v,
        cu.to(torch.int32),
        kwargs["cu_seq_lens_k"].to(torch.int32),
        kwargs["max_length_q"],
        kwargs["max_length_k"],
        **options,
    )
    return out[None], None


def _varlen_kernel_usable(query: torch.Tensor) -> bool:
    return query.device.type == "cuda" and query.dtype in (torch.bfloat16, torch.float16)


def _sdpa(module, query, key, value, attention_mask, scaling, dropout, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(
        module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
    )


def _varlen_attn():
    from torch.nn.attention.varlen import varlen_attn

    return varlen_attn


def _varlen_options(scaling: float | None) -> dict:
    """Causal, grouped-query and scale keywords as this torch spells them: 2.10 has `is_causal`;
    later releases take `window_size=(-1, 0)` for causal, and `enable_gqa`."""
    params = _varlen_parameters(_varlen_attn())
    options = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
    if "enable_gqa" in params:
        options["enable_gqa"] = True
    if "scale" in params:
        options["scale"] = scaling
    return options


@functools.lru_cache(maxsize=4)
def _varlen_parameters(fn) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)


# --------------------------------------------------------------------------- registration


def _mask_unless_unpadded(*, attention_mask=None, **kwargs):
    """The mask for our two paths: none for a row without a padding mask (packed training rows
    carry their boundaries in kwargs instead); sdpa's padding mask otherwise (generation)."""
    from transformers.masking_utils import sdpa_mask

    if attention_mask is None:
        return None
    return sdpa_mask(attention_mask=attention_mask, **kwargs)


def register_attention() -> None:
    """Make `torch_varlen` and `per_sequence` valid `attn_implementation` names (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    for name, fn in (
        ("torch_varlen", torch_varlen_attention),
        ("per_sequence", per_sequence_attention),
    ):
        AttentionInterface.register(name, fn)
        AttentionMaskInterface.register(name, _mask_unless_unpadded)
