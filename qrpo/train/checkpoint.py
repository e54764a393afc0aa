"""Complete checkpoints: written to a temporary folder with a manifest, renamed, then marked latest.

    run_dir/checkpoints/step_00000040/   accelerate save_state (model, optimizer, scheduler,
                                          RNG of every process) + trainer.json + manifest.json
    run_dir/checkpoints/latest           the name of the newest checkpoint written (a hint only)

manifest.json lists every other file of the checkpoint with its size and sha256. A checkpoint is
trusted only when every listed file is there with its size (checked for every checkpoint on each
resume: cheap) and, for the one about to be loaded, its hash (one read of the files). So a folder
that was half-copied, truncated by a full disk, or is missing a file is skipped, with the reason,
and resume falls back to the newest complete one before it.

A process killed while saving leaves a `.tmp` folder that is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST = "manifest.json"
TRAINER = "trainer.json"
_CHUNK = 16 << 20


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step_") or name.endswith(".tmp"):
        return None
    try:
        return int(name.removeprefix("step_"))
    except ValueError:
        return None


def step_folders(run_dir: str | Path) -> list[tuple[int, Path]]:
    """Every finished-looking checkpoint folder, newest first (complete or not)."""
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    found = [(_step_of(p), p) for p in root.iterdir() if p.is_dir()]
    return sorted(((s, p) for s, p in found if s is not None), reverse=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


# Folders whose hashes matched their manifest in this process, with each file's stat then. The
# loop plans its resume twice (before taking the run lock and again under it); a multi-GB
# checkpoint is read once, unless a file of it was written since (its size, mtime or ctime).
_VERIFIED: dict[Path, tuple] = {}


def _stat_stamp(folder: Path, names: list[str]) -> tuple:
    stats = [(folder / n).stat() for n in names]
    return tuple(
        (n, s.st_ino, s.st_size, s.st_mtime_ns, s.st_ctime_ns) for n, s in zip(names, stats)
    )


def _hash_all(folder: Path, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large updates: the files of a multi-GB checkpoint (model,
    # optimizer, one shard per rank) are hashed in parallel, one read each.
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda n: _sha256(folder / n), names)))


def write_manifest(folder: Path) -> None:
    """Sizes and hashes of every file in `folder` (written once, after every rank's files are)."""
    names = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST
    )
    hashes = _hash_all(folder, names)
    files = {n: {"size": (folder / n).stat().st_size, "sha256": hashes[n]} for n in names}
    tmp = folder / (MANIFEST + ".tmp")
    with tmp.open("w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(folder / MANIFEST)


def check_checkpoint(folder: Path, hashes: bool) -> str | None:
    """Why `folder` cannot be trusted, or None when it is complete (sizes; hashes if asked)."""
    if not folder.is_dir():
        return "missing"
    try:
        files = json.loads((folder / MANIFEST).read_text())["files"]
    except FileNotFoundError:
        return f"no {MANIFEST}: unfinished, or saved before manifests"
    except (ValueError, KeyError, TypeError):
        return f"unreadable {MANIFEST}"
    if TRAINER not in files:
        return f"no {TRAINER} in its manifest"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} missing"
        size = path.stat().st_size
        if size != meta["size"]:
            return f"{name} is {size} bytes, the manifest says {meta['size']}"
    if hashes:
        stamp = _stat_stamp(folder, list(files))
        if _VERIFIED.get(folder.resolve()) == stamp:
            return None
        got = _hash_all(folder, list(files))
        for name, meta in files.items():
            if got[name] != meta["sha256"]:
                return f"{name} does not match its sha256 in the manifest"
        _VERIFIED[folder.resolve()] = stamp
    return None


@dataclass
class Found:
    """The newest complete checkpoint (None: none) and every newer one skipped, with why."""

    checkpoint: Path | None = None
    step: int = 0
    trainer: dict = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)  # "step_00000006 (optimizer.bin missing)"
    any_folder: bool = False  # a checkpoint folder or the latest marker existed at all

    def skipped_line(self) -> str:
        return "; ".join(self.skipped)


def find_checkpoint(run_dir: str | Path) -> Found:
    """Newest first: the first checkpoint whose files have their sizes and hashes."""
    root = checkpoint_root(run_dir)
    out = Found()
    folders = step_folders(run_dir)
    marker = root / "latest"
    out.any_folder = bool(folders) or marker.is_file()
    if marker.is_file():
        named = root / marker.read_text().strip()
        if named.name and not named.is_dir():
            # The marker is written after the rename, so the folder it names was complete once.
            out.skipped.append(f"{named.name} (missing; named by checkpoints/latest)")
    for _, folder in folders:
        # Sizes first for every candidate; the hash read is paid only for the one chosen.
        why = check_checkpoint(folder, hashes=False) or check_checkpoint(folder, hashes=True)
        if why is None:
            try:
                trainer = json.loads((folder / TRAINER).read_text())
            except ValueError:
                why = f"unreadable {TRAINER}"
            else:
                out.checkpoint, out.step, out.trainer = folder, int(trainer["step"]), trainer
                return out
        out.skipped.append(f"{folder.name} ({why})")
    return out


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The newest checkpoint whose files have the sizes of its manifest (no hash read)."""
    for _, folder in step_folders(run_dir):
        if check_checkpoint(folder, hashes=False) is None:
            return folder
    return None


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
        (tmp / TRAINER).write_text(json.dumps({**trainer_state, "step": step}))
        write_manifest(tmp)  # last: a folder with a manifest has all its files
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        marker_tmp = root / "latest.tmp"
        marker_tmp.write_text(final.name)
        marker_tmp.replace(root / "latest")
        prune(run_dir, step, keep)
    accelerator.wait_for_everyone()
    return final


def prune(run_dir: str | Path, step: int, keep: int) -> None:
    """After saving `step`: keep the `keep` newest complete checkpoints (always `step` itself,
    complete by construction, so the only complete checkpoint is never removed). Folders past
    `step` belong to a trajectory abandoned at a resume from an older checkpoint; incomplete ones
    before it can never be loaded. Both go."""
    complete = 0
    for s, folder in step_folders(run_dir):
        if s > step:
            shutil.rmtree(folder, ignore_errors=True)
            continue
        if s == step or check_checkpoint(folder, hashes=False) is None:
            complete += 1
            if s == step or keep <= 0 or complete <= keep:
                continue
        elif keep <= 0:
            continue
        shutil.rmtree(folder, ignore_errors=True)


def load_checkpoint(accelerator, path: Path) -> dict:
    accelerator.load_state(str(path))
    return json.loads((path / TRAINER).read_text())
