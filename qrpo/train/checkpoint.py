"""Complete checkpoints: written to a temporary folder, renamed, then marked latest.

    run_dir/checkpoints/step_00000040/   accelerate save_state (model, optimizer, scheduler,
                                          RNG of every process) + trainer.json
    run_dir/checkpoints/latest           the name of the newest complete checkpoint

A process killed while saving leaves a `.tmp` folder that is never read, and `latest` still names
the previous complete checkpoint.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    marker = checkpoint_root(run_dir) / "latest"
    if not marker.is_file():
        return None
    path = checkpoint_root(run_dir) / marker.read_text().strip()
    return path if (path / "trainer.json").is_file() else None


def save_checkpoint(
    accelerator, run_dir: str | Path, step: int, trainer_state: dict, keep: int
) -> Path:
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"step_{step:08d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    # save_state returning on one rank does not mean every rank's files are written.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / "trainer.json").write_text(json.dumps({**trainer_state, "step": step}))
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name)
        marker_tmp.replace(root / "latest")
        done = sorted(p for p in root.glob("step_*") if p.is_dir() and not p.name.endswith(".tmp"))
        for old in done[:-keep] if keep > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / "trainer.json").read_text())
