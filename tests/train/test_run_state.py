"""Run state that cannot be silently damaged: only complete checkpoints (manifest of sizes and
hashes) are resumed, a run directory with history but no usable checkpoint is never started
fresh over, the data fingerprint is compared like the config, and torn log tails are trimmed."""

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

from qrpo.common.config import ConfigError, build_config
from qrpo.common.tiny import TASK
from qrpo.train.checkpoint import find_checkpoint, prune, write_manifest
from qrpo.train.config import TrainConfig
from qrpo.train.resume import HISTORY, plan_resume
from qrpo.train.train import train
from tests.train.tiny_runs import grouped_rows, write_jsonl


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = [
        {"prompt": p, "completion": TASK.demonstration(p, rng, noise=0.3)}
        for p in TASK.prompts("train", 8)
    ]
    return write_jsonl(path, rows)


def _cfg(run_dir: Path, data: str, *overrides: str) -> TrainConfig:
    return build_config(
        TrainConfig,
        None,
        [
            f"data.path={data}",
            "data.max_length=48",
            "loss.algorithm=sft",
            f"run.run_dir={run_dir}",
            "run.trackers=[]",
            "run.plot=false",
            "run.global_batch=2",
            "run.micro_batch_tokens=256",
            "run.peak_tflops=1.0",
            "run.max_steps=4",
            "run.save_every=2",
            "run.keep_checkpoints=2",
            "optim.lr=3e-4",
            "optim.scheduler=constant",
            "optim.warmup_ratio=0.0",
            *overrides,
        ],
    )


def _losses(run_dir: Path) -> list[float]:
    return [
        json.loads(line)["loss"]
        for line in (run_dir / "metrics.jsonl").read_text().split("\n")[:-1]
    ]


def _snapshot(run_dir: Path) -> dict:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_model(monkeypatch):
    import qrpo.train.train as loop

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("model loaded"))


def test_missing_newest_checkpoint_never_wipes_the_run(tmp_path, data, monkeypatch, capsys):
    run = tmp_path / "run"
    train(_cfg(run, data))
    full = _losses(run)
    ckpts = run / "checkpoints"
    shutil.rmtree(ckpts / "step_00000004")  # deleted, or half-copied away
    before = _snapshot(run)

    # Another lr: compared with the older complete checkpoint (step 2), so it refuses; nothing
    # written. (Before: "no checkpoint", a fresh start over the run, the old checkpoints pruned.)
    import qrpo.train.train as loop

    real = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError, match=r"checkpoint at step 2 .*\n  optim.lr: 0.0003 -> 0.001"):
        train(_cfg(run, data, "optim.lr=1e-3"))
    assert _snapshot(run) == before
    assert "step_00000004 (missing; named by checkpoints/latest)" in capsys.readouterr().out

    # The same config resumes from step 2 and ends where the uninterrupted run ended.
    monkeypatch.setattr(loop, "load_model", real)
    train(_cfg(run, data))
    assert _losses(run) == full
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002", "step_00000004"]

    # No complete checkpoint left at all: refuse with one line naming what is there, any mode
    # but never (which refuses any used folder already).
    shutil.rmtree(ckpts / "step_00000002")
    (ckpts / "step_00000004" / "optimizer.bin").unlink()
    before = _snapshot(run)
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    for mode in ("auto", "force"):
        with pytest.raises(ConfigError) as info:
            train(_cfg(run, data, "optim.lr=1e-3", f"run.resume={mode}"))
        message = str(info.value)
        assert "\n" not in message
        assert f"run.resume={mode}: {run} holds an earlier run (checkpoints, " in message
        assert "no complete checkpoint (step_00000004 (optimizer.bin missing))" in message
        assert _snapshot(run) == before


def test_a_killed_first_run_without_checkpoint_restarts_only_with_its_own_config(
    tmp_path, data, no_model
):
    run = tmp_path / "run"
    cfg = _cfg(run, data)
    from qrpo.train.resume import ResumePlan, record_start

    record_start(cfg, ResumePlan("auto"))  # the start of a job killed before its first save
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    assert plan_resume(cfg, {"examples": 8}, 2).checkpoint is None  # the same run: starts over
    with pytest.raises(ConfigError, match=r"no checkpoint, and a config.yaml with other optim.lr"):
        plan_resume(_cfg(run, data, "optim.lr=1e-3"), {"examples": 8}, 2)


def test_a_truncated_optimizer_falls_back_to_the_checkpoint_before(tmp_path, data, capsys):
    run = tmp_path / "run"
    train(_cfg(run, data))
    full = _losses(run)
    newest = run / "checkpoints" / "step_00000004"
    optimizer = newest / "optimizer.bin"
    size = optimizer.stat().st_size
    with optimizer.open("r+b") as f:
        f.truncate(size // 2)
    capsys.readouterr()
    train(_cfg(run, data))
    out = capsys.readouterr().out
    assert (
        f"checkpoints skipped (not complete): step_00000004 (optimizer.bin is {size // 2} bytes, "
        f"the manifest says {size})" in out
    )
    assert "at step 2" in out
    assert _losses(run) == full
    assert optimizer.stat().st_size == size  # step 4 was trained and saved again

    # Same size, other bytes (a bit flip, a copy from another run): caught by the hash.
    model = newest / "model.safetensors"
    raw = bytearray(model.read_bytes())
    raw[-1] ^= 0xFF
    model.write_bytes(bytes(raw))
    found = find_checkpoint(run)
    assert found.step == 2
    assert found.skipped == [
        "step_00000004 (model.safetensors does not match its sha256 in the manifest)"
    ]


def _fake(root: Path, step: int, complete: bool = True) -> None:
    folder = root / "checkpoints" / f"step_{step:08d}"
    folder.mkdir(parents=True)
    (folder / "trainer.json").write_text(json.dumps({"step": step}))
    (folder / "optimizer.bin").write_bytes(b"x" * 100)
    write_manifest(folder)
    if not complete:
        (folder / "optimizer.bin").write_bytes(b"x" * 10)


def test_pruning_keeps_complete_checkpoints_only(tmp_path):
    # Resumed from step 2 past a broken step 6; step 3 just saved, keep 1. Before, the broken
    # newer folder counted as one of the kept and the complete ones went.
    for step, complete in ((1, True), (2, True), (3, True), (6, False)):
        _fake(tmp_path, step, complete)
    (tmp_path / "checkpoints" / "step_00000001" / "manifest.json").unlink()
    prune(tmp_path, 3, keep=2)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step_00000002", "step_00000003"]
    prune(tmp_path, 3, keep=1)
    assert find_checkpoint(tmp_path).step == 3
    assert [p.name for p in (tmp_path / "checkpoints").iterdir()] == ["step_00000003"]


def test_changed_data_with_the_same_count_stops_auto_and_force_records_it(tmp_path):
    rows = grouped_rows(4, 4)
    path = tmp_path / "grouped.jsonl"
    data = write_jsonl(path, rows)
    args = ("loss.algorithm=qrpo", "run.global_batch=16", "run.epochs=2", "run.save_every=0")
    one, two = "run.max_steps=1", "run.max_steps=2"
    train(_cfg(tmp_path / "run", data, *args, one))
    # Rows reordered and a reward changed: the same 16 examples in number.
    rows = rows[::-1]
    rows[0]["responses"][0]["reward"] += 0.25
    write_jsonl(path, rows)
    with pytest.raises(ConfigError) as info:
        train(_cfg(tmp_path / "run", data, *args, one))
    message = str(info.value)
    assert "checkpoint at step 1" in message
    assert "  training data changed since the checkpoint: fingerprint " in message
    assert "…, 16 examples both\n" in message
    assert "  reference data changed since the checkpoint: fingerprint " in message

    train(_cfg(tmp_path / "run", data, *args, two, "run.resume=force"))
    history = yaml.safe_load((tmp_path / "run" / HISTORY).read_text())
    assert history[-1]["action"] == "resumed at step 1"
    assert set(history[-1]["forced"]) == {"training data", "reference data"}
    # The next checkpoint carries the new fingerprint: auto resumes without a word. (The loop
    # raises data.min_ref_rewards to the algorithm's need before it plans; so does this.)
    cfg = _cfg(tmp_path / "run", data, *args, two, "data.min_ref_rewards=1")
    plan = plan_resume(cfg, find_checkpoint(tmp_path / "run").trainer, 16)
    assert plan.step == 2 and plan.trajectory == {}


def test_torn_log_tails_are_trimmed_on_resume(tmp_path, data, capsys):
    run = tmp_path / "run"
    train(_cfg(run, data, "run.max_steps=2", "run.save_every=1"))
    full = _losses(run)
    # A kill mid-write: the last record of each log cut short.
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 3, "loss": 5.')
    with (run / HISTORY).open("a") as f:
        f.write("- time: 2024-01-01 00:00:00 UTC\n  resume: au")
    capsys.readouterr()
    train(_cfg(run, data, "run.max_steps=3", "run.save_every=1"))
    out = capsys.readouterr().out
    assert "metrics.jsonl: trimmed a torn last record (22 bytes without a newline)" in out
    assert f"{run / HISTORY}: trimmed a torn or unreadable tail" in out
    assert _losses(run)[:2] == full and len(_losses(run)) == 3
    history = yaml.safe_load((run / HISTORY).read_text())
    assert [h["action"] for h in history] == ["fresh", "resumed at step 2"]


def test_a_verified_checkpoint_is_hashed_once_until_a_file_changes(tmp_path, monkeypatch):
    """The loop plans its resume twice (before the run lock and under it): the second plan must
    not read a multi-GB checkpoint again, but a file written since is hashed anew."""
    import qrpo.train.checkpoint as ckpt

    _fake(tmp_path, 2)
    reads = []
    real = ckpt._sha256
    monkeypatch.setattr(ckpt, "_sha256", lambda path: reads.append(path.name) or real(path))
    assert find_checkpoint(tmp_path).step == 2 and find_checkpoint(tmp_path).step == 2
    assert sorted(reads) == ["optimizer.bin", "trainer.json"]
    optimizer = tmp_path / "checkpoints" / "step_00000002" / "optimizer.bin"
    optimizer.write_bytes(b"y" * 100)  # same size, other bytes
    found = find_checkpoint(tmp_path)
    assert found.checkpoint is None and "does not match its sha256" in found.skipped_line()
