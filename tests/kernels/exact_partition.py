"""log Z_f(beta) from the paper's closed forms (arXiv 2507.08068, Table 4) at 50 digits: the
expected values of the loss and partition tests, sharing no code with qrpo/kernels/qrpo.py."""

import mpmath

mpmath.mp.dps = 50


def exact_log_z(transform: str, beta: float, sigma: float = 1.0) -> float:
    """log Z_f(beta) from the paper's closed forms, evaluated at 50 digits (no rewriting)."""
    b = mpmath.mpf(beta)
    if transform == "identity":
        z = b * (mpmath.exp(1 / b) - 1)
    elif transform == "log":
        z = b / (b + 1)
    elif transform == "normal_icdf":
        z = mpmath.exp(1 / (2 * b**2))
    elif transform == "scaled_normal_icdf":
        z = mpmath.exp(mpmath.mpf(sigma) ** 2 / (2 * b**2))
    elif transform == "square":
        z = mpmath.sqrt(mpmath.pi * b) / 2 * mpmath.erfi(1 / mpmath.sqrt(b))
    elif transform == "sqrt":
        z = 2 * b * (b + (1 - b) * mpmath.exp(1 / b))
    else:  # a new transform: write its closed form here
        raise KeyError(f"no high-precision Z for transform {transform!r}")
    return float(mpmath.log(z))
