"""Shared by the loss tests: scalar references of the formulas in plain Python, and checks."""

import math

import torch

F64 = torch.float64


# --- scalar references -------------------------------------------------------------------------


def sigmoid(x: float) -> float:
    if x >= 0:
        return 1.0 / (1.0 + math.exp(-x))
    return math.exp(x) / (1.0 + math.exp(x))


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def identity_beta_logz(beta: float) -> float:
    """beta * log(beta * (exp(1/beta) - 1)), without forming exp(1/beta)."""
    return beta * (math.log(beta) + 1.0 / beta + math.log1p(-math.exp(-1.0 / beta)))


# --- helpers -------------------------------------------------------------------------------------


def policy_logps(n: int) -> torch.Tensor:
    return (-1.0 - 60.0 * torch.rand(n, dtype=F64)).requires_grad_()


def ref_of(logps: torch.Tensor, scale: float = 2.0) -> torch.Tensor:
    """Reference log-probs a few nats from the policy's (tests mark them requires_grad to show
    that they receive no gradient)."""
    return (logps.detach() + scale * torch.randn(logps.shape, dtype=F64)).to(logps.dtype)


def grads(loss: torch.Tensor, *inputs: torch.Tensor) -> tuple:
    return torch.autograd.grad(loss.sum(), inputs, allow_unused=True)


def floats(t: torch.Tensor) -> list[float]:
    return [float(v) for v in t.detach().double().tolist()]


def tensor(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=F64)


def assert_no_grad(*gs) -> None:
    for g in gs:
        assert g is None or torch.count_nonzero(g) == 0


def assert_metrics_detached(metrics: dict) -> None:
    for name, value in metrics.items():
        assert isinstance(value, torch.Tensor), name
        assert not value.requires_grad, name
