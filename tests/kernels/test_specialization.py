"""Triton must not compile a new kernel variant when only the micro-batch changes.

Triton specializes integer arguments (== 1, divisible by 16) and pointer alignment unless told
not to, and silently ignores a name in `do_not_specialize` that is not a parameter. The compiled
(not interpreted) kernels are inspected in a fresh process, since the test session interprets."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

_PROBE = """
import json
from qrpo.kernels import logprobs_kernels as lk, qrpo_triton as qt
out = {}
for name, kernel in [("fwd", lk._logprobs_fwd_kernel), ("bwd", lk._logprobs_bwd_kernel),
                     ("qrpo_fwd", qt._qrpo_fwd_kernel), ("qrpo_bwd", qt._qrpo_bwd_kernel)]:
    out[name] = {p.name: [p.do_not_specialize, p.do_not_specialize_on_alignment]
                 for p in kernel.params}
print(json.dumps(out))
"""


def test_per_batch_arguments_are_not_specialized():
    from qrpo.kernels import logprobs_kernels as lk

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", _PROBE], capture_output=True, text=True, env=env, check=True
    )
    params = json.loads(run.stdout)
    wanted = {
        "fwd": (lk.FWD_PER_BATCH_INTS, lk.FWD_PER_BATCH_POINTERS),
        "bwd": (lk.BWD_PER_BATCH_INTS, lk.BWD_PER_BATCH_POINTERS),
        "qrpo_fwd": (("B",), ()),
        "qrpo_bwd": (("B",), ()),
    }
    for kernel, (ints, pointers) in wanted.items():
        flags = params[kernel]
        assert set(ints) | set(pointers) <= set(flags), f"{kernel}: a listed name is no parameter"
        for name, (general, any_alignment) in flags.items():
            assert general == (name in ints), (kernel, name)
            assert any_alignment == (name in pointers), (kernel, name)
        # The weight, hidden states and the model's dims stay specialized.
        for name in ("w_ptr", "h_ptr", "D", "stride_w"):
            if name in flags:
                assert flags[name] == [False, False], (kernel, name)
