"""The closed-form log partition function (kernels.log_partition) against high-precision values,
scipy's Dawson function and direct numerical integration."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.integrate
import scipy.special
import torch
from exact_partition import exact_log_z

from qrpo.kernels import log_partition
from qrpo.kernels.qrpo import TRANSFORMS  # a new transform is tested everywhere below


@pytest.mark.parametrize(
    "beta,want", [(3e-4, 0.99757), (1e-3, 0.99309), (1e-2, 0.95395), (0.1, 0.76974)]
)
def test_identity_partition_exact_values(beta, want):
    """beta * log Z for the identity transform, Z = beta (exp(1/beta) - 1) (paper, Table 4),
    against its values to five digits."""
    got = beta * log_partition("identity", beta).item()
    assert got == pytest.approx(want, abs=6e-6)
    assert log_partition("identity", torch.tensor(beta)).dtype == torch.float64


@pytest.mark.parametrize("transform", TRANSFORMS)
@pytest.mark.parametrize("beta", [3e-4, 1e-3, 1e-2, 0.1, 0.3, 1.0, 3.0])
def test_log_partition_against_high_precision(transform, beta):
    beta_t = torch.tensor([beta], dtype=torch.float64)
    got = log_partition(transform, beta_t, sigma=torch.tensor([0.7], dtype=torch.float64)).item()
    want = exact_log_z(transform, beta, 0.7)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("beta", [3e-4, 1e-2, 0.3, 1.0, 10.0])
def test_square_partition_against_dawson(beta):
    """log Z = 1/beta + log(beta)/2 + log dawsn(1/sqrt(beta)) (scipy's Dawson function)."""
    want = 1 / beta + 0.5 * math.log(beta) + math.log(scipy.special.dawsn(1 / math.sqrt(beta)))
    assert log_partition("square", beta).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.filterwarnings("ignore::scipy.integrate.IntegrationWarning")  # log(q) at q -> 0
@pytest.mark.parametrize("transform", ["identity", "log", "square", "sqrt", "normal_icdf"])
@pytest.mark.parametrize("beta", [0.3, 1.0, 3.0])
def test_log_partition_against_quadrature(transform, beta):
    """Z = int_0^1 exp(f(q)/beta) dq by direct numerical integration, for moderate beta."""
    f = {
        "identity": lambda q: q,
        "log": np.log,
        "square": np.square,
        "sqrt": np.sqrt,
        "normal_icdf": scipy.special.ndtri,
    }[transform]
    z, _ = scipy.integrate.quad(lambda q: np.exp(f(q) / beta), 0, 1, limit=500)
    assert log_partition(transform, beta).item() == pytest.approx(math.log(z), rel=1e-7)
