"""generate's model paths checked before any step runs: one line naming the key, exit 2."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_a_missing_model_path_is_one_line_before_any_step(tmp_path):
    out_dir = tmp_path / "gen"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qrpo.generate.pipeline",
            f"model.name_or_path={tmp_path}/sft/final",
            f"out={out_dir}",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines == [f"error: model.name_or_path: model path does not exist: {tmp_path}/sft/final"]
    assert not out_dir.exists()
