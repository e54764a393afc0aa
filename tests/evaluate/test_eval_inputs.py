"""evaluate's inputs checked before its work: a damaged second model stops before the reference
is sampled, and a full disk at the end says so, naming the folder; one line, exit 2."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FAST = ["n_prompts=2", "n=1", "max_new_tokens=8", "kl=false", "plots=false"]


def _evaluate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "qrpo.evaluate", *FAST, *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def _last_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and out.stderr.rstrip().endswith(errors[0]), out.stderr[-2000:]
    return errors[0]


def test_a_truncated_second_model_stops_before_the_reference_is_sampled(tmp_path):
    from qrpo.common.tiny import ensure_tiny

    damaged = tmp_path / "policy"
    shutil.copytree(ensure_tiny(), damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # a copy cut short
    out = _evaluate(f"models=[tiny,{damaged}]", f"out={tmp_path / 'eval.json'}")
    line = _last_error_line(out)
    assert line.startswith(f"error: models[1]: {weights}: truncated or corrupt safetensors"), line
    assert "sampling" not in out.stdout  # used to fail only after the reference was sampled


def test_a_full_disk_is_named(tmp_path):
    # /dev/full answers every write with ENOSPC: a real full disk for the results file.
    (tmp_path / "eval.json").symlink_to("/dev/full")
    out = _evaluate("models=[tiny,tiny]", f"out={tmp_path / 'eval.json'}")
    line = _last_error_line(out)
    assert line == f"error: disk full (no space left on device) while writing {tmp_path}", line
