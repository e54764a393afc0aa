"""fused_head_loss against the float64 two-pass reference and the fp32 two-pass path.

Reference: float64 log-probs from the naive backend (full logits, autograd), the same loss_fn,
backward through autograd. The fused pass must give the same loss, log-probs and gradients of
hidden, weight and bias, for pointwise (QRPO, SFT) and pair (DPO) losses, at odd sizes: vocabulary
not a multiple of the tile, one-token and empty sequences, a sequence (and a pair) longer than a
chunk (the two-pass fallback), and chunk sizes at which a per-sequence planner would split a pair.
Triton runs through the CPU interpreter in fp32 with tiny tiles.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels import fused_head_loss, qrpo_loss, sequence_logprobs
from qrpo.kernels.fused_head import MAX_LOGITS_ELEMENTS, default_chunk_tokens, plan_chunks
from qrpo.kernels.logprobs_triton import TritonConfig, use_config

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]


@pytest.fixture(autouse=True)
def _tiny_tiles():
    cfg = TritonConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1,
                       chunk_tokens=16, vocab_slice=64)  # fmt: skip
    with use_config(cfg):
        yield


def make_inputs(lengths: list[int], dim: int, vocab: int, bias: bool = True):
    n = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int64)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    targets = torch.randint(0, vocab, (n,))
    targets[torch.rand(n) < 0.2] = IGNORE_INDEX
    return dict(
        hidden=torch.randn(n, dim),
        weight=torch.randn(vocab, dim) * 0.3,
        bias=torch.randn(vocab) if bias else None,
        targets=targets,
        cu_seqlens=cu,
    )


def qrpo_closure(num_seqs: int):
    ref = torch.randn(num_seqs) * 5 - 20
    rewards, ref_rewards = torch.rand(num_seqs), torch.rand(num_seqs, 6)

    def loss_fn(logps):
        return qrpo_loss(logps.float(), ref, rewards, ref_rewards, 0.05, backend="torch").sum()

    return loss_fn


def dpo_closure(num_seqs: int):
    ref = torch.randn(num_seqs) * 5 - 20

    def loss_fn(logps):
        h = (logps[0::2] - ref[0::2].to(logps)) - (logps[1::2] - ref[1::2].to(logps))
        return -F.logsigmoid(0.1 * h).sum() / 7.0  # a global normaliser, as in the loop

    return loss_fn


def sft_closure(num_seqs: int):
    return lambda logps: -logps.sum() / 31.0


def reference(inp: dict, loss_fn, dtype: torch.dtype, backend: str, **kw) -> list:
    """Two-pass path: sequence_logprobs, loss_fn, autograd backward."""
    leaves = {k: inp[k].to(dtype).requires_grad_() for k in ("hidden", "weight", "bias")
              if inp[k] is not None}  # fmt: skip
    logps = sequence_logprobs(
        leaves["hidden"], leaves["weight"], inp["targets"], inp["cu_seqlens"],
        bias=leaves.get("bias"), backend=backend, **kw,
    )  # fmt: skip
    loss = loss_fn(logps)
    loss.backward()
    return [loss.detach(), logps.detach()] + [leaves[k].grad for k in leaves]


def fused(inp: dict, loss_fn, backend: str, **kw) -> list:
    leaves = {k: inp[k].clone().requires_grad_() for k in ("hidden", "weight", "bias")
              if inp[k] is not None}  # fmt: skip
    loss, logps = fused_head_loss(
        leaves["hidden"], leaves["weight"], inp["targets"], inp["cu_seqlens"], loss_fn,
        bias=leaves.get("bias"), backend=backend, **kw,
    )  # fmt: skip
    assert not logps.requires_grad
    (loss * 1.5).backward()  # backward scales the stored gradients by the upstream gradient
    return [loss.detach() * 1.5, logps] + [leaves[k].grad for k in leaves]


def assert_close(got: list, want: list, rtol: float, atol: float) -> None:
    names = ("loss", "logps", "d_hidden", "d_weight", "d_bias")
    for name, g, w in zip(names, got, want):
        torch.testing.assert_close(g.double(), w.double(), rtol=rtol, atol=atol,
                                   msg=lambda m, name=name: f"{name}: {m}")  # fmt: skip


CASES = {
    # pointwise: one-token and empty sequences, a 30-token sequence longer than a 16-token chunk
    "qrpo": dict(loss=qrpo_closure, group=1, lengths=[1, 0, 9, 30, 5, 2, 0, 4]),
    "sft": dict(loss=sft_closure, group=1, lengths=[3, 1, 0, 20, 6]),
    # pairs: (5, 6) then (4, 7) would be split by a per-sequence planner at 16 tokens; the pair
    # (12, 9) is longer than a chunk; an empty rejected and a one-token chosen
    "dpo": dict(loss=dpo_closure, group=2, lengths=[5, 6, 4, 7, 12, 9, 1, 0, 3, 2]),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_fused_equals_reference_and_two_pass(backend: str, name: str) -> None:
    case = CASES[name]
    kw = dict(temperature=0.9, softcap=6.0) if name == "qrpo" else {}
    inp = make_inputs(case["lengths"], dim=24, vocab=131, bias=name != "sft")
    loss_fn = case["loss"](len(case["lengths"]))
    want = reference(inp, loss_fn, torch.float64, "naive", **kw)
    want[0] = want[0] * 1.5
    for k in range(2, len(want)):
        want[k] = want[k] * 1.5
    got = fused(inp, loss_fn, backend, group_size=case["group"], chunk_tokens=16, **kw)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
    two_pass = reference(inp, loss_fn, torch.float32, backend, **kw)
    two_pass = [two_pass[0] * 1.5, two_pass[1]] + [g * 1.5 for g in two_pass[2:]]
    assert_close(got, two_pass, rtol=1e-5, atol=1e-5)
    # Ignored tokens and empty sequences get exactly zero gradient.
    assert torch.all(got[2][inp["targets"] == IGNORE_INDEX] == 0)


def test_plan_keeps_groups_whole() -> None:
    bounds = [0, 5, 11, 15, 22, 34, 43, 44, 44]
    # pairs: (0,1)=11 tokens, (2,3)=11, (4,5)=21 > 16 alone, (6,7)=1
    assert plan_chunks(bounds, 2, 16) == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert plan_chunks(bounds, 2, 22) == [(0, 4), (4, 8)]
    assert plan_chunks(bounds, 1, 16) == [(0, 3), (3, 4), (4, 5), (5, 8)]
    assert plan_chunks([0], 1, 16) == [(0, 0)]


def test_default_chunk_fits_the_largest_group_up_to_twice_the_budget() -> None:
    budget = MAX_LOGITS_ELEMENTS["cuda"] // 152064  # 1,765 tokens at the Qwen2.5 vocabulary
    pairs = [0, 1000, 2000, 3000, 4000]
    assert default_chunk_tokens(pairs, 2, 152064, "cuda") == 2000
    assert default_chunk_tokens(pairs, 1, 152064, "cuda") == budget
    long_pair = [0, 3000, 6000]
    assert default_chunk_tokens(long_pair, 2, 152064, "cuda") == 2 * budget  # then two passes
    assert default_chunk_tokens([0], 1, 152064, "cuda") == budget


def test_without_grad_matches_two_pass() -> None:
    inp = make_inputs([4, 9, 1], dim=24, vocab=50)
    loss_fn = sft_closure(3)
    with torch.no_grad():
        loss, logps = fused_head_loss(
            inp["hidden"], inp["weight"], inp["targets"], inp["cu_seqlens"], loss_fn,
            bias=inp["bias"], backend="torch",
        )  # fmt: skip
    want = reference(inp, loss_fn, torch.float64, "naive")
    torch.testing.assert_close(logps.double(), want[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss.double(), want[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(group_size=2), "group_size"),
        (dict(host_cu_seqlens=[0, 13]), "host_cu_seqlens"),
        (dict(backend="naive"), "backend"),
    ],
)
def test_bad_arguments_raise(kw: dict, match: str) -> None:
    inp = make_inputs([4, 9, 1], dim=8, vocab=20)
    with pytest.raises(ValueError, match=match):
        fused_head_loss(inp["hidden"], inp["weight"], inp["targets"], inp["cu_seqlens"],
                        sft_closure(3), **kw)  # fmt: skip


def test_loss_fn_must_return_a_scalar() -> None:
    inp = make_inputs([4, 9], dim=8, vocab=20)
    h = inp["hidden"].requires_grad_()
    with pytest.raises(ValueError, match="scalar"):
        fused_head_loss(h, inp["weight"], inp["targets"], inp["cu_seqlens"], lambda lp: -lp,
                        backend="torch")  # fmt: skip


# ---------------------------------------------------------------------------------------------
# CUDA: compiled kernels with the GPU tile table (run by the GPU job, skipped on CPU)
# ---------------------------------------------------------------------------------------------

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture
def gpu_tiles():
    """The device's own tile table instead of the tiny CPU tiles of this file's fixture."""
    import qrpo.kernels.tiles as tiles

    previous, tiles._OVERRIDE = tiles._OVERRIDE, None
    yield
    tiles._OVERRIDE = previous


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_fused_matches_two_pass(dtype: torch.dtype, gpu_tiles) -> None:
    """Pairs at realistic logits: one pair fits a 1,024-token chunk, one (0 + 1,300 tokens) takes
    the two-pass route, an empty and a one-token sequence; float64 reference on rounded inputs."""
    dim, vocab = 512, 32000
    inp = make_inputs([700, 1, 0, 1300, 300, 301], dim=dim, vocab=vocab)
    inp["weight"] = inp["weight"] * (2 / dim**0.5 / 0.3)
    rounded = {k: (v.to(dtype).double() if v is not None and v.is_floating_point() else v)
               for k, v in inp.items()}  # fmt: skip
    cuda = {k: (v.cuda() if v is not None else None) for k, v in inp.items()}
    cuda_rounded = {k: (v.cuda() if v is not None else None) for k, v in rounded.items()}
    # Reference log-probs near the policy's, so that no pair's sigmoid saturates.
    with torch.no_grad():
        logps = sequence_logprobs(
            cuda_rounded["hidden"], cuda_rounded["weight"], inp["targets"].cuda(),
            inp["cu_seqlens"].cuda(), bias=cuda_rounded["bias"], backend="naive",
        )  # fmt: skip
    ref = logps.float() + torch.randn(6, device="cuda") * 5

    def cuda_loss(lp):
        h = (lp[0::2] - ref[0::2].to(lp)) - (lp[1::2] - ref[1::2].to(lp))
        return -F.logsigmoid(0.1 * h).sum() / 7.0

    want = reference(cuda_rounded, cuda_loss, torch.float64, "naive")
    half = {k: (v.to(dtype) if v is not None and v.is_floating_point() else v)
            for k, v in cuda.items()}  # fmt: skip
    got = fused(half, cuda_loss, "triton", group_size=2, chunk_tokens=1024)
    two_pass = reference(half, cuda_loss, dtype, "triton")
    two_pass = [two_pass[0] * 1.5, two_pass[1]] + [g * 1.5 for g in two_pass[2:]]
    want = [want[0] * 1.5, want[1]] + [g * 1.5 for g in want[2:]]
    if dtype == torch.float32:
        assert_close([g.cpu() for g in got], [w.cpu() for w in want], rtol=1e-5, atol=1e-4)
        assert_close([g.cpu() for g in got], [t.cpu() for t in two_pass], rtol=1e-5, atol=1e-4)
        return
    torch.testing.assert_close(got[1].double(), want[1], rtol=0, atol=1e-2)
    torch.testing.assert_close(got[1], two_pass[1], rtol=0, atol=1e-3)
    for g, r in zip(got[2:], want[2:]):
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


@pytest.mark.gpu
@requires_cuda
def test_cuda_backward_has_no_vocab_by_dim_fp32_buffer(gpu_tiles) -> None:
    """sequence_logprobs forward+backward at a 128k vocabulary: the extra memory beyond inputs and
    gradients stays well under the V x D fp32 accumulator (1.05 GB here) that the backward used
    to keep."""
    n, dim, vocab = 2048, 2048, 128256
    h = torch.randn(n, dim, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(vocab, dim, device="cuda") * 0.04).bfloat16().requires_grad_()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    cu = torch.tensor([0, 1000, n], device="cuda")
    sequence_logprobs(h, w, targets, cu, backend="triton").sum().backward()  # compile first
    h.grad = w.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    sequence_logprobs(h, w, targets, cu, backend="triton").sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - h.grad.nbytes - w.grad.nbytes
    assert extra < 0.4 * vocab * dim * 4, f"{extra / 2**20:.0f} MiB"
    assert torch.isfinite(w.grad.float()).all()


@pytest.mark.gpu
@requires_cuda
def test_cuda_fused_pass_has_no_host_sync(gpu_tiles) -> None:
    """With host_cu_seqlens and check_targets=False the fused QRPO pass never blocks on the
    device (torch's sync debug mode turns a synchronising call into an error)."""
    inp = make_inputs([30, 0, 50, 7], dim=64, vocab=1000)
    h = inp["hidden"].cuda().requires_grad_()
    w = inp["weight"].cuda().requires_grad_()
    targets, cu = inp["targets"].cuda(), inp["cu_seqlens"].cuda()
    bounds = inp["cu_seqlens"].tolist()
    rewards, ref_rewards = torch.rand(4, device="cuda"), torch.rand(4, 8, device="cuda")
    ref = torch.full((4,), -300.0, device="cuda")

    def step() -> None:
        loss, _ = fused_head_loss(
            h, w, targets, cu,
            lambda lp: qrpo_loss(lp, ref, rewards, ref_rewards, 0.1, backend="triton").sum(),
            backend="triton", check_targets=False, host_cu_seqlens=bounds, chunk_tokens=40,
        )  # fmt: skip
        loss.backward()

    step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_default_slices_whole_tiles_over_a_padded_workspace(backend: str) -> None:
    """No explicit vocab slice: a chunk of 13 rows under a 700-element bound gets 32-column slices
    (whole tiles, not 700 // 13 = 53), in a workspace whose rows are 64 elements apart."""
    tiles = TritonConfig(block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1,
                         max_workspace_elements=700)  # fmt: skip
    inp = make_inputs([6, 7, 5, 9], dim=24, vocab=131)
    loss_fn = dpo_closure(4)
    want = reference(inp, loss_fn, torch.float64, "naive")
    want = [want[0] * 1.5, want[1]] + [g * 1.5 for g in want[2:]]
    with use_config(tiles):
        got = fused(inp, loss_fn, backend, group_size=2, chunk_tokens=16)
    assert_close(got, want, rtol=1e-5, atol=1e-5)
