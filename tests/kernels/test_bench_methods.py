"""The kernel bench's methods on CPU: each that returns per-sequence log-probs matches the float64
reference, forward and (through the summed loss) backward, at odd sizes. TRL's tiled kernel is
one of them where trl is installed: the bench times it only if it computes the same thing."""

import pytest
import torch

from qrpo.kernels.bench_measure import Shape, fp64_reference, make_inputs
from qrpo.kernels.bench_methods import available_methods

SHAPE = Shape("odd", tokens=77, dim=24, vocab=131, dtype="float32", seq_len=19)
METHODS = available_methods(torch.device("cpu"), compile_naive=False, seq_len=SHAPE.seq_len)
PER_SEQUENCE = ["torch", "naive", "trl-chunked"]


def _reference_grads(inputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    h = inputs["hidden"].double().requires_grad_()
    w = inputs["weight"].double().requires_grad_()
    t, cu = inputs["targets"], inputs["cu_seqlens"].tolist()
    valid = t != -100
    logp = torch.log_softmax(h @ w.T, dim=-1).gather(1, torch.where(valid, t, 0)[:, None])
    (logp.squeeze(1) * valid).sum().backward()
    assert cu[-1] == h.shape[0]
    return h.grad, w.grad


@pytest.mark.parametrize("name", PER_SEQUENCE)
def test_per_sequence_methods_match_float64(name: str) -> None:
    method = METHODS[name]
    if isinstance(method, str):
        pytest.skip(f"{name}: {method}")
    inputs = make_inputs(SHAPE, torch.device("cpu"), seed=3)
    h = inputs["hidden"].clone().requires_grad_()
    w = inputs["weight"].clone().requires_grad_()
    logps, loss = method(h, w, inputs["targets"], inputs["cu_seqlens"])
    want = fp64_reference(inputs)
    assert logps.shape == want.shape == (5,)
    torch.testing.assert_close(logps.double(), want, rtol=1e-5, atol=1e-4)
    loss.backward()
    grad_h, grad_w = _reference_grads(inputs)
    torch.testing.assert_close(h.grad.double(), grad_h, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad.double(), grad_w, rtol=1e-4, atol=1e-5)
