"""sequence_logprobs against a float64 reference (the naive backend on float64 copies).

The Triton backend runs through Triton's CPU interpreter here (tests/conftest.py), in fp32 only
for the general cases: the interpreter mis-computes bf16 tl.dot unless operands are upcast, which
the kernel does under the interpreter, so one bf16 case checks that path too. Tiles and chunks are
tiny so that ragged edges and several backward chunks are exercised on small shapes.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from qrpo.common.constants import IGNORE_INDEX
from qrpo.kernels import sequence_logprobs
from qrpo.kernels.logprobs_triton import TritonConfig, use_config
from qrpo.kernels.tiles import ChunkConfig, use_chunk_config

# Triton on CPU tensors needs the interpreter (set by tests/conftest.py when there is no CUDA);
# on a CUDA machine the same paths are covered by the `gpu` tests at the end of this file.
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
needs_interpreter = pytest.mark.skipif(not INTERPRETED, reason="Triton on CPU tensors")
BACKENDS = ["torch", pytest.param("triton", marks=needs_interpreter)]
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _tiny_tiles():
    """Backward chunks of 7 (torch) / 16 (triton) tokens, 32-wide vocab tiles, 16-wide D tiles,
    Triton backward vocab slices of 64 columns (several slices, the last one ragged)."""
    triton_cfg = TritonConfig(
        block_n=16, block_v=32, block_d=16, num_warps=1, num_stages=1, chunk_tokens=16,
        vocab_slice=64,
    )  # fmt: skip
    with use_chunk_config(ChunkConfig(chunk_tokens=7)), use_config(triton_cfg):
        yield


@dataclass
class Case:
    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    targets: torch.Tensor
    cu_seqlens: torch.Tensor
    grad_out: torch.Tensor


def make_case(
    lengths: list[int],
    dim: int,
    vocab: int,
    *,
    bias: bool = True,
    ignore_frac: float = 0.2,
    masked_seqs: tuple[int, ...] = (),
    cu_dtype: torch.dtype = torch.int64,
    scale: float = 0.3,
) -> Case:
    n = sum(lengths)
    cu = torch.zeros(len(lengths) + 1, dtype=cu_dtype)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    targets = torch.randint(0, vocab, (n,))
    targets[torch.rand(n) < ignore_frac] = IGNORE_INDEX
    for s in masked_seqs:
        targets[cu[s] : cu[s + 1]] = IGNORE_INDEX
    return Case(
        hidden=torch.randn(n, dim),
        weight=torch.randn(vocab, dim) * scale,
        bias=torch.randn(vocab) if bias else None,
        targets=targets,
        cu_seqlens=cu,
        grad_out=torch.randn(len(lengths)),
    )


def run(
    case: Case, backend: str, dtype: torch.dtype, device: str = "cpu", **kwargs
) -> list[torch.Tensor | None]:
    """Output and gradients (hidden, weight, bias) of the grad_out-weighted sum, on the CPU."""
    h = case.hidden.to(device, dtype, copy=True).requires_grad_()
    w = case.weight.to(device, dtype, copy=True).requires_grad_()
    b = None
    if case.bias is not None:
        b = case.bias.to(device, dtype, copy=True).requires_grad_()
    targets, cu = case.targets.to(device), case.cu_seqlens.to(device)
    out = sequence_logprobs(h, w, targets, cu, bias=b, backend=backend, **kwargs)
    (out * case.grad_out.to(device, out.dtype)).sum().backward()
    results = [out.detach(), h.grad, w.grad, b.grad if b is not None else None]
    return [r.cpu() if r is not None else None for r in results]


def assert_matches(got: list, want: list, rtol: float, atol: float) -> None:
    for name, g, r in zip(("logp", "d_hidden", "d_weight", "d_bias"), got, want):
        if r is None:
            assert g is None
            continue
        torch.testing.assert_close(
            g.double(), r, rtol=rtol, atol=atol, msg=lambda m, name=name: f"{name}: {m}"
        )


CASES = {
    # one-token, empty and fully masked sequences, bias, int32 cu_seqlens
    "edges": dict(lengths=[1, 0, 9, 0, 30], dim=33, vocab=131, masked_seqs=(2,), cu=torch.int32),
    "temperature": dict(lengths=[17, 23], dim=24, vocab=97, bias=False, temperature=0.7),
    "softcap": dict(lengths=[5] * 8, dim=33, vocab=50, temperature=1.3, softcap=3.0),
    "short_and_long": dict(lengths=[1, 2, 1, 3, 2, 31], dim=24, vocab=131, softcap=10.0),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(CASES))
def test_matches_float64_reference(backend: str, name: str) -> None:
    spec = dict(CASES[name])
    kwargs = {k: spec.pop(k) for k in ("temperature", "softcap") if k in spec}
    cu_dtype = spec.pop("cu", torch.int64)
    case = make_case(**spec, cu_dtype=cu_dtype)
    want = run(case, "naive", torch.float64, **kwargs)
    got = run(case, backend, torch.float32, **kwargs)
    assert got[0].dtype == torch.float32
    assert_matches(got, want, rtol=1e-5, atol=1e-5)

    # Empty and fully masked sequences: exactly 0, and their tokens get exactly zero gradient.
    lengths = spec["lengths"]
    cu = case.cu_seqlens.long()
    for s in range(len(lengths)):
        if lengths[s] == 0 or s in spec.get("masked_seqs", ()):
            assert got[0][s] == 0
            assert torch.all(got[1][cu[s] : cu[s + 1]] == 0)
    # Ignored tokens never receive gradient.
    assert torch.all(got[1][case.targets == IGNORE_INDEX] == 0)


@needs_interpreter
def test_triton_vocab_splits_merge() -> None:
    """Forward vocab splits (used when token blocks underfill the GPU) merge into the same LSE."""
    case = make_case([3, 20, 10], dim=33, vocab=131)
    want = run(case, "naive", torch.float64, softcap=5.0)
    cfg = TritonConfig(block_n=16, block_v=32, block_d=16, num_splits=3, chunk_tokens=16)
    with use_config(cfg):
        got = run(case, "triton", torch.float32, softcap=5.0)
    assert_matches(got, want, rtol=1e-5, atol=1e-5)


def test_torch_backend_vocab_slices() -> None:
    """The vocab-sliced path (used for half weights) also serves fp32 when asked: same result."""
    case = make_case([13, 20], dim=24, vocab=131)
    want = run(case, "naive", torch.float64, softcap=4.0, temperature=0.9)
    with use_chunk_config(ChunkConfig(chunk_tokens=5, vocab_slice=40)):
        got = run(case, "torch", torch.float32, softcap=4.0, temperature=0.9)
    assert_matches(got, want, rtol=1e-5, atol=1e-5)


def test_torch_backend_gradcheck() -> None:
    """The chunked backend's hand-written backward against finite differences (float64)."""
    case = make_case([3, 0, 5], dim=5, vocab=11, ignore_frac=0.25)
    h = case.hidden.double().requires_grad_()
    w = case.weight.double().requires_grad_()
    b = case.bias.double().requires_grad_()

    def fn(h, w, b):
        return sequence_logprobs(
            h, w, case.targets, case.cu_seqlens, bias=b, temperature=0.8, softcap=2.0,
            backend="torch",
        )  # fmt: skip

    with use_chunk_config(ChunkConfig(chunk_tokens=3, vocab_slice=4)):
        assert torch.autograd.gradcheck(fn, (h, w, b))


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_equals_separate(backend: str) -> None:
    """No leakage across packed sequences: each result equals that sequence computed alone."""
    lengths = [4, 11, 1, 9]
    case = make_case(lengths, dim=24, vocab=97)
    packed = run(case, backend, torch.float32)
    cu = case.cu_seqlens
    for s, n in enumerate(lengths):
        sl = slice(int(cu[s]), int(cu[s + 1]))
        alone = Case(
            case.hidden[sl],
            case.weight,
            case.bias,
            case.targets[sl],
            torch.tensor([0, n]),
            case.grad_out[s : s + 1],
        )
        single = run(alone, backend, torch.float32)
        torch.testing.assert_close(single[0][0], packed[0][s], rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(single[1], packed[1][sl], rtol=1e-5, atol=1e-6)


class TiedLM(torch.nn.Module):
    """Embedding and LM head share one matrix, as in tied-embedding models."""

    def __init__(self, vocab: int, dim: int) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.mix = torch.nn.Linear(dim, dim)

    def forward(self, ids, targets, cu, backend):
        hidden = torch.tanh(self.mix(self.embed(ids)))
        return sequence_logprobs(hidden, self.embed.weight, targets, cu, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_tied_embedding_gradient(backend: str) -> None:
    vocab, dim = 97, 24
    model = TiedLM(vocab, dim)
    ids = torch.randint(0, vocab, (30,))
    targets = torch.roll(ids, -1)
    targets[[9, 29]] = IGNORE_INDEX
    cu = torch.tensor([0, 10, 30])
    grad_out = torch.tensor([0.3, -1.7])

    ref = TiedLM(vocab, dim).double()
    ref.load_state_dict(model.state_dict())
    (ref(ids, targets, cu, "naive") * grad_out.double()).sum().backward()
    (model(ids, targets, cu, backend) * grad_out).sum().backward()
    # The model's own fp32 layers (embedding, tanh, linear) add their rounding on top of ours.
    for p, r in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad.double(), r.grad, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(
    "backend,dtype",
    [
        ("torch", torch.bfloat16),
        ("torch", torch.float16),
        pytest.param("triton", torch.bfloat16, marks=needs_interpreter),
    ],
)
def test_half_inputs_fp32_accuracy(backend: str, dtype: torch.dtype) -> None:
    """Half inputs: error vs fp64 on the same (rounded) inputs must be far below the error of a
    plain lm_head that rounds logits to the input dtype before the log-sum-exp."""
    case = make_case([60, 80], dim=33, vocab=131, ignore_frac=0.0, scale=1.0)
    rounded = Case(
        case.hidden.to(dtype).double(),
        case.weight.to(dtype).double(),
        case.bias.to(dtype).double(),
        case.targets,
        case.cu_seqlens,
        case.grad_out,
    )
    want = run(rounded, "naive", torch.float64)
    got = run(case, backend, dtype)
    naive = run(case, "naive", dtype)
    err = (got[0].double() - want[0]).abs().max().item()
    naive_err = (naive[0].double() - want[0]).abs().max().item()
    assert err < 1e-3, err
    assert err < naive_err / 20, (err, naive_err)
    assert got[1].dtype == dtype and got[2].dtype == dtype
    # Gradients are returned in the input dtype: compare at its resolution.
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_sum_is_exact_to_the_output_rounding(backend: str) -> None:
    """Long sequences of very unlikely tokens (~-13 nats each, bf16 inputs): the per-sequence
    total must equal the float64 one to within the rounding of the fp32 result itself. Summing
    the token log-probs in fp32 (the cause of most of the 0.012-0.029 nats measured on an H200)
    drifts by several ulps of the total here (0.0099 nats against a 0.0022 bound)."""
    n, dim, vocab = 3000, 8, 64
    hidden = torch.randn(n, dim).bfloat16()
    weight = (torch.randn(vocab, dim) * 3).bfloat16()
    targets = torch.randint(0, vocab, (n,))
    cu = torch.tensor([0, 1000, n])
    want = sequence_logprobs(hidden.double(), weight.double(), targets, cu, backend="naive")
    assert want.max() < -15000  # totals where one fp32 ulp is >= 2e-3 nats
    # Few, large tiles: the interpreter's cost grows with the number of programs.
    with use_config(TritonConfig(block_n=512, block_v=32, block_d=8, num_warps=1, num_stages=1)):
        got = sequence_logprobs(hidden, weight, targets, cu, backend=backend)
    err = (got.double() - want).abs()
    want32 = want.float()
    ulp = (torch.nextafter(want32, torch.tensor(-float("inf"))) - want32).double().abs()
    bound = 0.5 * ulp + n * 1e-7  # plus per-token fp32 rounding of max, log-sum-exp, target logit
    assert torch.all(err <= bound), (err, bound)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_tokens(backend: str) -> None:
    h = torch.zeros(0, 24, requires_grad=True)
    w = torch.randn(50, 24, requires_grad=True)
    out = sequence_logprobs(
        h, w, torch.zeros(0, dtype=torch.long), torch.tensor([0, 0]), backend=backend
    )
    assert out.shape == (1,) and out.item() == 0
    out.sum().backward()
    assert torch.all(w.grad == 0)


def _args(**over):
    args = dict(
        hidden=torch.randn(6, 8),
        weight=torch.randn(11, 8),
        targets=torch.tensor([1, 2, 3, -100, 4, 5]),
        cu_seqlens=torch.tensor([0, 2, 6]),
    )
    kwargs = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return args, kwargs


@pytest.mark.parametrize(
    "over,match",
    [
        (dict(hidden=torch.randn(6, 8, 1)), "hidden"),
        (dict(weight=torch.randn(11, 7)), "weight"),
        (dict(weight=torch.randn(11, 8, dtype=torch.float64)), "weight dtype"),
        (dict(bias=torch.randn(11, dtype=torch.float64)), "bias dtype"),
        (dict(bias=torch.randn(10)), "bias"),
        (dict(targets=torch.tensor([1, 2, 3])), "targets"),
        (dict(targets=torch.tensor([1, 2, 3, 4, 5, 6], dtype=torch.int32)), "targets"),
        (dict(targets=torch.tensor([1, 2, 3, 11, 4, 5])), "targets"),
        (dict(targets=torch.tensor([1, 2, 3, -1, 4, 5])), "targets"),
        (dict(cu_seqlens=torch.tensor([1, 2, 6])), "cu_seqlens must start at 0"),
        (dict(cu_seqlens=torch.tensor([0, 2, 5])), "cu_seqlens must end"),
        (dict(cu_seqlens=torch.tensor([0, 4, 2, 6])), "cu_seqlens must be non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0.0, 6.0])), "cu_seqlens"),
        (dict(cu_seqlens=torch.tensor([[0, 6]])), "cu_seqlens"),
        (dict(backend="cuda"), "backend"),
        (dict(temperature=0.0), "temperature"),
        (dict(softcap=-1.0), "softcap"),
        (dict(backend="triton", hidden=torch.randn(6, 8).double()), "hidden"),
    ],
)
def test_bad_arguments_raise(over: dict, match: str) -> None:
    args, kwargs = _args(**over)
    if "hidden" in over and over["hidden"].dtype == torch.float64 and "weight" not in over:
        args["weight"] = args["weight"].double()
    with pytest.raises(ValueError, match=match):
        sequence_logprobs(**args, **kwargs)


def test_check_targets_false_skips_target_check() -> None:
    """check_targets=False skips the synced target check; on CPU cu_seqlens stays checked."""
    args, _ = _args(targets=torch.tensor([1, 2, 3, 11, 4, 5]))
    sequence_logprobs(**args, check_targets=False, backend="torch")  # not checked, no crash
    args, _ = _args(cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="cu_seqlens"):
        sequence_logprobs(**args, check_targets=False)


def test_naive_bf16_is_the_rounded_logits_baseline() -> None:
    """The naive backend rounds logits like a plain lm_head (documented baseline)."""
    case = make_case([40], dim=33, vocab=97, bias=False, ignore_frac=0.0, scale=1.0)
    h, w = case.hidden.bfloat16(), case.weight.bfloat16()
    logits = F.linear(h, w).float()
    want = torch.log_softmax(logits, -1).gather(1, case.targets[:, None]).sum()
    got = sequence_logprobs(h, w, case.targets, case.cu_seqlens, backend="naive")
    torch.testing.assert_close(got[0], want)


def test_torch_backend_peak_memory() -> None:
    """At N=4096, V=32000, D=256 fp32 the torch backend's extra memory (forward + backward, beyond
    inputs and gradients) stays under 10% of the full logits (524 MB). Measured in a fresh process
    as the peak-RSS increase, see qrpo/kernels/bench_measure.py:cpu_peak_extra_bytes."""
    code = (
        "from qrpo.kernels.bench_measure import cpu_peak_extra_bytes;"
        "print(cpu_peak_extra_bytes('torch', 4096, 256, 32000, seq_len=512))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=300
    )
    extra = int(out.stdout.strip().splitlines()[-1])
    logits_bytes = 4096 * 32000 * 4
    assert extra <= 0.10 * logits_bytes, f"{extra / 2**20:.1f} MiB"


@pytest.mark.gpu
@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap", [None, 30.0])
def test_cuda_triton_matches_float64(dtype: torch.dtype, softcap: float | None) -> None:
    """Compiled kernels with the GPU tile defaults, several backward chunks, realistic logits."""
    dim, vocab = 512, 32000
    case = make_case([700, 1, 0, 1300], dim=dim, vocab=vocab, scale=2 / math.sqrt(dim))
    rounded = Case(
        case.hidden.to(dtype).double(),
        case.weight.to(dtype).double(),
        case.bias.to(dtype).double(),
        case.targets,
        case.cu_seqlens,
        case.grad_out,
    )
    want = run(rounded, "naive", torch.float64, "cuda", softcap=softcap)
    with use_config(TritonConfig(max_workspace_elements=8 * 2**20)):  # 256-token chunks
        got = run(case, "triton", dtype, "cuda", softcap=softcap)
    if dtype == torch.float32:
        assert_matches(got, want, rtol=1e-5, atol=1e-4)
        return
    naive = run(case, "naive", dtype, "cuda", softcap=softcap)
    err = (got[0].double() - want[0]).abs().max().item()
    naive_err = (naive[0].double() - want[0]).abs().max().item()
    assert err < 1e-2 and err < naive_err / 10, (err, naive_err)
    for g, r in zip(got[1:], want[1:]):
        torch.testing.assert_close(g.double(), r, rtol=2e-2, atol=2e-2 * r.abs().max().item())


@pytest.mark.gpu
@requires_cuda
def test_cuda_training_step_has_no_host_sync() -> None:
    """With check_targets=False, log-probs and the QRPO loss, forward and backward, never block on
    the device (torch's sync debug mode turns any synchronising call into an error)."""
    from qrpo.kernels import qrpo_loss

    case = make_case([30, 0, 50, 7], dim=64, vocab=1000)
    h = case.hidden.cuda().requires_grad_()
    w = case.weight.cuda().requires_grad_()
    targets, cu = case.targets.cuda(), case.cu_seqlens.cuda()
    rewards, ref_rewards = torch.randn(4, device="cuda"), torch.randn(4, 8, device="cuda")

    def step() -> None:
        logps = sequence_logprobs(h, w, targets, cu, backend="triton", check_targets=False)
        loss = qrpo_loss(logps, logps.detach() + 1.0, rewards, ref_rewards, 0.1, backend="triton")
        loss.sum().backward()

    step()  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_module_face_matches_functional() -> None:
    from qrpo.kernels import SequenceLogprobs

    case = make_case([4, 9], dim=24, vocab=50)
    module = SequenceLogprobs(temperature=0.8, softcap=5.0, backend="torch")
    got = module(case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias)
    want = sequence_logprobs(
        case.hidden, case.weight, case.targets, case.cu_seqlens, bias=case.bias,
        temperature=0.8, softcap=5.0, backend="naive",
    )  # fmt: skip
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)
    with pytest.raises(ValueError, match="backend"):
        SequenceLogprobs(backend="jax")
