"""The sandbox fixtures of the sandbox tests (test_eval_sandbox*.py)."""

import warnings

import pytest

from qrpo.common.sandbox import Sandbox, SandboxConfig, SandboxError


@pytest.fixture(scope="module")
def sandbox():
    # Small limits keep the hostile runs short: 2 s CPU, 256 MiB, 1 s wall.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # missing layers: see `isolated`
            return Sandbox(SandboxConfig(cpu_seconds=2, memory_mb=256, wall_seconds=1.0, workers=2))
    except SandboxError as err:
        pytest.skip(f"no sandbox on this machine: {err}")


@pytest.fixture(scope="module")
def isolated(sandbox):
    """The sandbox, where the machine allows every isolation layer (the hostile corpus)."""
    if sandbox.missing_layers():
        pytest.skip(f"isolation layers unavailable here: {sandbox.missing_layers()}")
    return sandbox
