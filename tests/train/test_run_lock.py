"""One training process per run_dir: a second real `python -m qrpo.train` on a run_dir that a
running training holds refuses with one line naming the holder, and writes nothing; the lock
goes with the holder when it is killed."""

import signal
import subprocess
import sys

import pytest

from qrpo.common.run_lock import RunLockError, hold
from tests.train.test_train import ROOT, _cli, _env, _wait_for_checkpoint


def test_a_second_training_refuses_a_held_run_dir(tmp_path, data_files):
    run_dir = tmp_path / "run"
    args = [
        sys.executable,
        *_cli(run_dir, data_files["grouped"], "run.max_steps=200", "run.save_every=2"),
    ]
    holder = subprocess.Popen(
        args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        _wait_for_checkpoint(run_dir, 2)
        # Frozen mid-run: it holds the lock (and everything it had open) without moving on.
        holder.send_signal(signal.SIGSTOP)
        logged = (run_dir / "metrics.jsonl").read_text()
        history = (run_dir / "config_history.yaml").read_text()
        second = subprocess.run(
            [*args, "optim.lr=3e-3"], cwd=ROOT, env=_env(), capture_output=True, text=True
        )
        assert second.returncode == 2, second.stderr[-2000:]
        assert "Traceback" not in second.stderr
        last = second.stderr.rstrip().split("\n")[-1]
        assert last.startswith(f"error: {run_dir} is in use by {holder.pid}@"), last
        assert "run.run_dir" in last
        # Nothing of the holder's run was touched: no log lines, no start recorded.
        assert (run_dir / "metrics.jsonl").read_text() == logged
        assert (run_dir / "config_history.yaml").read_text() == history
        with pytest.raises(RunLockError, match=f"in use by {holder.pid}@"), hold(run_dir):
            pass
    finally:
        holder.kill()  # SIGKILL ends a stopped process too
        holder.wait()
    # The kernel released the dead holder's lock: nothing stale to clean up.
    with hold(run_dir):
        pass
