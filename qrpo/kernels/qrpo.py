"""QRPO loss in plain PyTorch: the CPU path, the fallback and the reference for the Triton kernel.

QRPO (Matrenok et al., arXiv 2507.08068) regresses the policy's log-ratio onto a target built
from the quantile of the completion's reward among K reference rewards of the same prompt:

    q        = P_{y' ~ pi_ref}[R(x, y') <= R(x, y)]          (estimated from K reference rewards)
    residual = f(q) - beta * log Z_f(beta) - beta * (logp(y|x) - logp_ref(y|x))
    loss     = residual**2                                   (or |residual|)

Under pi_ref the true quantile is Uniform(0, 1), so Z_f(beta) = int_0^1 exp(f(q)/beta) dq is known
in closed form for every transform f below (paper, Table 4). The estimated quantile is not uniform
at finite K or under ties; qrpo/kernels/partition.py holds the forms of log Z for that case
(docs/partition.md). All of that is computed here in float64: it is O(B * K) work, and float64
keeps log Z exact at beta = 3e-4 where 1/beta = 3333.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import Tensor

TRANSFORMS = ("identity", "log", "normal_icdf", "scaled_normal_icdf", "square", "sqrt")
ESTIMATORS = ("inclusive", "midrank", "randomized")
LOSS_TYPES = ("squared", "absolute")

# Gauss-Legendre rule for the `square` partition integral J(beta) (see `log_partition`). The
# integrand is entire and decays at least like exp(-v) on [0, 40], so 96 nodes are exact to
# float64 rounding for every beta (checked against scipy's Dawson function in the tests).
_GL_NODES, _GL_WEIGHTS = np.polynomial.legendre.leggauss(96)
_GL_CACHE: dict[torch.device, tuple[Tensor, Tensor]] = {}
_SQUARE_CUTOFF = 40.0


def _gauss_legendre(device: torch.device) -> tuple[Tensor, Tensor]:
    # Copied to the device once, then reused: later calls stay free of host-to-device copies.
    if device not in _GL_CACHE:
        nodes = torch.tensor(_GL_NODES, dtype=torch.float64, device=device)
        weights = torch.tensor(_GL_WEIGHTS, dtype=torch.float64, device=device)
        _GL_CACHE[device] = (nodes, weights)
    return _GL_CACHE[device]


def _as_float64(x: float | Tensor, device: torch.device | None = None) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(torch.float64)
    return torch.tensor(float(x), dtype=torch.float64, device=device)


def log_partition(
    transform: str, beta: float | Tensor, sigma: float | Tensor | None = None
) -> Tensor:
    """log Z_f(beta) for Z_f(beta) = int_0^1 exp(f(q)/beta) dq, in float64 and stable forms.

    exp(1/beta) is never formed (it overflows float32 below beta ~ 0.011 and float64 below
    beta ~ 1.4e-3); every closed form is rewritten so that 1/beta appears only additively:

    - identity:  log(beta) + 1/beta + log1p(-exp(-1/beta))
    - log:       log(beta) - log1p(beta)
    - normal_icdf:        1 / (2 beta^2)
    - scaled_normal_icdf: sigma^2 / (2 beta^2)
    - sqrt:      log(2 beta) + 1/beta + log1p(beta * expm1(-1/beta))
    - square:    1/beta + log(beta) + log J(beta),
                 J(beta) = int_0^{min(1/beta, 40)} exp(-2v + beta v^2) dv

    The `square` form comes from substituting q = 1 - beta*v in int_0^1 exp(q^2/beta) dq. torch has
    no Dawson function, so J is integrated with a fixed Gauss-Legendre rule in torch ops on
    beta's device (no host sync); the integrand is <= exp(-v), so cutting at v = 40 loses < e^-40.

    Args:
        transform: one of TRANSFORMS.
        beta: KL coefficient, a float or a tensor (any shape, > 0).
        sigma: scale of `scaled_normal_icdf` (float or tensor broadcastable with beta).

    Returns:
        float64 tensor of beta's shape (0-d for a float beta) on beta's device.
    """
    if transform not in TRANSFORMS:
        raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")
    b = _as_float64(beta)
    if transform == "identity":
        return torch.log(b) + 1.0 / b + torch.log1p(-torch.exp(-1.0 / b))
    if transform == "log":
        return torch.log(b) - torch.log1p(b)
    if transform == "normal_icdf":
        return 0.5 / (b * b)
    if transform == "scaled_normal_icdf":
        if sigma is None:
            raise ValueError("sigma is required for transform='scaled_normal_icdf'")
        s = _as_float64(sigma, b.device)
        return 0.5 * (s * s) / (b * b)
    if transform == "sqrt":
        return torch.log(2.0 * b) + 1.0 / b + torch.log1p(b * torch.expm1(-1.0 / b))
    # square
    nodes, weights = _gauss_legendre(b.device)
    upper = torch.clamp(1.0 / b, max=_SQUARE_CUTOFF).unsqueeze(-1)  # [..., 1]
    v = 0.5 * upper * (nodes + 1.0)  # [..., 96] nodes mapped onto [0, upper]
    bb = b.unsqueeze(-1)
    j = 0.5 * upper.squeeze(-1) * (weights * torch.exp(-2.0 * v + bb * v * v)).sum(-1)
    return 1.0 / b + torch.log(b) + torch.log(j)


@dataclass
class QRPOStats:
    """Per-sample diagnostics of one QRPO loss call, all detached float32 tensors of shape [B].

    q is the estimated quantile before any clamping that the transform applies; fq = f(q) after it.
    target_log_ratio = (fq - beta_logz) / beta is the regression target of logp - logp_ref.
    """

    q: Tensor
    fq: Tensor
    beta_logz: Tensor
    target_log_ratio: Tensor
    residual: Tensor
    log_ratio: Tensor

    def to_dict(self) -> dict[str, Tensor]:
        return asdict(self)


def reference_validity(
    ref_rewards: Tensor, ref_mask: Tensor | None, exclude_index: Tensor | None
) -> Tensor:
    """[B, K] bool: which reference rewards of each row enter its quantile estimate."""
    valid = torch.ones_like(ref_rewards, dtype=torch.bool) if ref_mask is None else ref_mask.bool()
    if exclude_index is not None:
        cols = torch.arange(ref_rewards.shape[1], device=ref_rewards.device)
        valid = valid & (cols[None, :] != exclude_index[:, None].long())
    return valid


def draw_uniform(batch: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """U ~ Uniform(0, 1) per sample for the randomized tie-break, shared by both backends.

    Drawn with torch on the tensors' device so that the Triton path and this path consume the same
    random stream: with the same seeded generator both return the same quantiles.
    """
    return torch.rand(batch, generator=generator, device=device, dtype=torch.float32)


def estimate_quantile(
    rewards: Tensor,
    ref_rewards: Tensor,
    valid: Tensor,
    estimator: str,
    uniform: Tensor | None,
) -> tuple[Tensor, Tensor]:
    """Quantile of each reward among its row's valid reference rewards (float64), and K_valid.

    inclusive:  #{ref <= r} / K          (ties count fully; q in {0, 1/K, ..., 1})
    midrank:    (#{ref < r} + #{ref == r}/2) / K
    randomized: (#{ref < r} + U * #{ref == r}) / K   (randomized PIT: uniform even with ties)
    """
    r = rewards[:, None]
    less = ((ref_rewards < r) & valid).sum(1).to(torch.float64)
    equal = ((ref_rewards == r) & valid).sum(1).to(torch.float64)
    k_valid = valid.sum(1).to(torch.float64)
    if estimator == "inclusive":
        count = less + equal
    elif estimator == "midrank":
        count = less + 0.5 * equal
    elif estimator == "randomized":
        count = less + uniform.to(torch.float64) * equal
    else:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    return count / k_valid, k_valid


def apply_transform(q: Tensor, k_valid: Tensor, transform: str, sigma: Tensor | None) -> Tensor:
    """f(q) with the clamps that keep it finite: log needs q >= 1/K, the normal icdf q in
    [1/K, (K-1)/K] (K = this row's number of valid reference rewards)."""
    if transform == "identity":
        return q
    if transform == "log":
        return torch.log(torch.maximum(q, 1.0 / k_valid))
    if transform in ("normal_icdf", "scaled_normal_icdf"):
        clamped = torch.minimum(torch.maximum(q, 1.0 / k_valid), (k_valid - 1.0) / k_valid)
        z = torch.special.ndtri(clamped)
        return z if transform == "normal_icdf" else sigma.to(torch.float64) * z
    if transform == "square":
        return q * q
    if transform == "sqrt":
        return torch.sqrt(q)
    raise ValueError(f"transform must be one of {TRANSFORMS}, got {transform!r}")


def qrpo_loss_torch(
    logps: Tensor,
    ref_logps: Tensor,
    rewards: Tensor,
    ref_rewards: Tensor,
    beta: Tensor,
    beta_logz: Tensor,
    *,
    transform: str,
    ref_mask: Tensor | None,
    sigma: Tensor | None,
    estimator: str,
    exclude_index: Tensor | None,
    loss_type: str,
    uniform: Tensor | None,
) -> tuple[Tensor, QRPOStats]:
    """Per-sample QRPO loss [B] (float32) and its stats; inputs already validated by the API.

    `beta` and `beta_logz` (beta * log Z of each row, from qrpo.kernels.partition.row_log_partition)
    are float64 [B] tensors. Everything runs in float64 through plain autograd; only `logps`
    carries gradient (d loss / d logps = dloss/dresidual * -beta): log Z is a constant of the
    regression whichever form computed it.
    """
    valid = reference_validity(ref_rewards, ref_mask, exclude_index)
    q, k_valid = estimate_quantile(rewards, ref_rewards, valid, estimator, uniform)
    fq = apply_transform(q, k_valid, transform, sigma)
    beta_logz = beta_logz.detach().to(torch.float64)
    log_ratio = logps.to(torch.float64) - ref_logps.detach().to(torch.float64)
    residual = fq - beta_logz - beta * log_ratio
    loss = residual.square() if loss_type == "squared" else residual.abs()
    stats = QRPOStats(
        q=q.float(),
        fq=fq.float(),
        beta_logz=beta_logz.float(),
        target_log_ratio=((fq - beta_logz) / beta).float(),
        residual=residual.detach().float(),
        log_ratio=log_ratio.detach().float(),
    )
    return loss.float(), stats
