"""The methods `python -m qrpo.kernels.bench` times: each maps (hidden, weight, targets, cu_seqlens) to
(per-sequence log-probs or None, a scalar to backpropagate).

- "triton", "torch", "naive" (+ "naive+compile"): `sequence_logprobs`, summed: two passes
  (forward, then a backward that recomputes the logits): 4 GEMM units.
- "fused-qrpo", "fused-dpo": `fused_head_loss` with the QRPO loss of each sequence (synthetic
  rewards and reference log-probs) and with DPO on consecutive chosen/rejected pairs: 3 units.
- "liger(none)", "liger(mean)": Liger-Kernel's fused linear cross-entropy; "none" recomputes in
  backward like ours (4 units); "mean" computes the gradient in forward (3 units) and gives no
  per-token values.
- "liger-dpo": Liger's `LigerFusedLinearDPOLoss` (chunked_loss, gradient in forward through
  torch.func), padded [2B, T, D] layout, no reference model: 3 units.
- "cce": Apple's Cut Cross-Entropy (skips small-softmax gradient tiles).
- "trl-chunked": TRL's `ChunkedLogProbFunction`, the tiled log-prob kernel its DPOTrainer uses
  (cuBLAS GEMM tiles of TRL's own vocabulary width, a Triton online log-sum-exp; torch ops on
  CPU), on the valid tokens only as TRL calls it, then summed per sequence.

Pair methods (fused-dpo, liger-dpo) cut the N tokens into an even number of equal sequences of
about the shape's length (16 x 1,024 at N = 16,384) so that every sequence has a partner; Liger's
layout needs N divisible by it, so a remainder of < 2B tokens is left out there.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import Tensor

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels.fused_head import fused_head_loss
from qrpo.kernels.logprobs_api import sequence_logprobs
from qrpo.kernels.qrpo_api import qrpo_loss
from qrpo.kernels.segments import segment_sum, sequence_ids

Method = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor | None, Tensor]]

# GEMM units (2*N*D*V FLOP each) of one forward+backward, for the floor percentage.
GEMM_UNITS = {"liger(mean)": 3, "fused-qrpo": 3, "fused-dpo": 3, "liger-dpo": 3}


def pair_bounds(n: int, seq_len: int) -> list[int]:
    """An even number (>= 2) of near-equal sequences of about seq_len tokens covering n."""
    num = max(2, 2 * (n // (2 * seq_len)))
    return [i * n // num for i in range(num + 1)]


def _ours(backend: str) -> Method:
    def run(h, w, t, cu):
        out = sequence_logprobs(h, w, t, cu, backend=backend, check_targets=False)
        return out, out.sum()

    return run


def _triton_promoted() -> Method:
    """The Triton backend with the tile table's choice, but tensor-core partial sums promoted to
    the fp32 accumulator every 2 BLOCK_D slices (qrpo/kernels/logprobs_triton.py, Precision). The
    benchmark runs it, forward and backward, inside `method_context`."""
    run = _ours("triton")
    run.promote_every = 2
    return run


def method_context(method: Method, device: torch.device, dtype: torch.dtype, dim: int, vocab: int):
    """The tile configuration a method asks for, around all of its calls (forward and backward)."""
    promote = getattr(method, "promote_every", None)
    if promote is None:
        return contextlib.nullcontext()
    from qrpo.kernels.tiles import current_config, use_config

    cfg = current_config(device, dtype, dim, vocab)
    return use_config(
        replace(cfg, promote_every=promote, source=f"{cfg.source} +promote {promote}")
    )


def _naive_compiled() -> Method:
    from qrpo.kernels.reference import naive_sequence_logprobs

    compiled = torch.compile(naive_sequence_logprobs, dynamic=False)

    def run(h, w, t, cu):
        out = compiled(h, w, t, cu)
        return out, out.sum()

    return run


def _fused_qrpo() -> Method:
    cache: dict = {}

    def run(h, w, t, cu):
        key = (h.shape[0], cu.numel())
        if key not in cache:  # constants of the loss, made once per shape (not timed)
            g = torch.Generator(device="cpu").manual_seed(1)
            s = cu.numel() - 1
            cache[key] = (
                cu.tolist(),
                (torch.randn(s, generator=g) * 20 - 12000).to(h.device),  # reference log-probs
                torch.rand(s, generator=g).to(h.device),  # rewards
                torch.rand(s, 8, generator=g).to(h.device),  # 8 reference rewards
            )
        bounds, ref, rewards, ref_rewards = cache[key]

        def loss_fn(logps):
            return qrpo_loss(logps, ref, rewards, ref_rewards, 1e-3).sum()

        loss, logps = fused_head_loss(
            h, w, t, cu, loss_fn, check_targets=False, host_cu_seqlens=bounds
        )
        return logps, loss

    return run


def _fused_dpo(seq_len: int) -> Method:
    def run(h, w, t, cu):
        bounds = pair_bounds(h.shape[0], seq_len)
        pairs = torch.tensor(bounds, device=h.device)
        ref = torch.full((len(bounds) - 1,), -12000.0, device=h.device)

        def loss_fn(logps):
            ratio = logps - ref
            return -F.logsigmoid(0.1 * (ratio[0::2] - ratio[1::2])).sum()

        loss, logps = fused_head_loss(
            h, w, t, pairs, loss_fn, group_size=2, check_targets=False, host_cu_seqlens=bounds
        )
        return None, loss

    return run


def _liger(reduction: str) -> Method:
    from liger_kernel.ops.fused_linear_cross_entropy import (
        LigerFusedLinearCrossEntropyFunction as Flce,
    )

    def run(h, w, t, cu):
        # Positional: input, weight, target, bias, ce_weight, ignore_index, lse_square_scale,
        # label_smoothing, reduction, softcap, return_z_loss, accum_dtype (fp32 dW, like ours).
        loss = Flce.apply(
            h, w, t, None, None, IGNORE_INDEX, 0.0, 0.0, reduction, None, False, torch.float32
        )[0]
        if reduction == "mean":
            return None, loss
        out = -segment_sum(loss.float(), sequence_ids(cu, h.shape[0]), cu.numel() - 1)
        return out, out.sum()

    return run


def _liger_dpo(seq_len: int) -> Method:
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    wanted = dict(ignore_index=IGNORE_INDEX, beta=0.1, compute_nll_loss=False, use_ref_model=False)
    accepted = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
    module = LigerFusedLinearDPOLoss(**{k: v for k, v in wanted.items() if k in accepted})

    def run(h, w, t, cu):
        bounds = pair_bounds(h.shape[0], seq_len)
        num, length = len(bounds) - 1, h.shape[0] // (len(bounds) - 1)
        # Liger stacks all chosen rows, then all rejected ones: [2B, T, D].
        x = h[: num * length].view(num, length, -1)
        y = t[: num * length].view(num, length)
        out = module(w, x, y)
        return None, out[0] if isinstance(out, tuple) else out

    return run


def _cce() -> Method:
    from cut_cross_entropy import linear_cross_entropy

    def run(h, w, t, cu):
        loss = linear_cross_entropy(h, w, t, ignore_index=IGNORE_INDEX, reduction="none")
        out = -segment_sum(loss.float(), sequence_ids(cu, h.shape[0]), cu.numel() - 1)
        return out, out.sum()

    return run


def _trl_chunked() -> Method:
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer import utils as trl_utils

    # TRL's own vocabulary tile width, as its trainers pass it (32,768 in TRL 1.16).
    chunk = getattr(trl_utils, "_CHUNKED_LOGPROB_CHUNK_SIZE", 32768)

    def run(h, w, t, cu):
        valid = t != IGNORE_INDEX
        # Positional: hidden, weight, bias, targets, temperature, chunk_size, softcap,
        # logit_scale, optional outputs (none).
        picked = ChunkedLogProbFunction.apply(
            h[valid], w, None, t[valid], 1.0, chunk, None, 1.0, ()
        )
        token_logp = (
            picked[0].float().new_zeros(h.shape[0]).masked_scatter(valid, picked[0].float())
        )
        out = segment_sum(token_logp, sequence_ids(cu, h.shape[0]), cu.numel() - 1)
        return out, out.sum()

    return run


def available_methods(
    device: torch.device, compile_naive: bool, seq_len: int = 1000
) -> dict[str, Method | str]:
    """Method name -> callable, or a string saying why it is skipped."""
    methods: dict[str, Method | str] = {}
    cuda = device.type == "cuda"
    methods["triton"] = _ours("triton") if cuda else "skipped: Triton on CPU only interprets"
    if cuda:
        methods["triton+promote"] = _triton_promoted()
    methods["torch"] = _ours("torch")
    methods["naive"] = _ours("naive")
    if compile_naive:
        methods["naive+compile"] = _naive_compiled()
    methods["fused-qrpo"] = _fused_qrpo()
    methods["fused-dpo"] = _fused_dpo(seq_len)
    try:  # TRL's kernel also runs on CPU (torch ops in place of Triton)
        methods["trl-chunked"] = _trl_chunked()
    except ImportError as e:
        methods["trl-chunked"] = f"skipped: {e}"
    for name, make in (
        ("liger(none)", lambda: _liger("none")),
        ("liger(mean)", lambda: _liger("mean")),
        ("liger-dpo", lambda: _liger_dpo(seq_len)),
        ("cce", _cce),
    ):
        if not cuda:
            methods[name] = "skipped: needs CUDA"
            continue
        try:
            methods[name] = make()
        except ImportError as e:
            methods[name] = f"skipped: {e}"
    return methods
