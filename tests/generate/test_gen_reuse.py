"""Output is reused only when it is this run's: a finished shard made with another model,
another sample.n or from another input is refused (naming what changed) or, with
overwrite=true, made again; and one process per shard folder (real processes), while other
shards of the same step run at the same time; one merge per output."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrpo.common.config import build_config
from qrpo.common.run_lock import RunLockError, hold_file
from qrpo.common.tiny import TASK
from qrpo.generate.config import PipelineConfig
from qrpo.generate.pipeline import run_pipeline, run_step
from qrpo.generate.shards import ShardError, read_rows_parquet

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QUIET = lambda *_: None  # noqa: E731
SHARD = "shard-00000-of-00001"


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(out: Path, data: str, *overrides: str) -> PipelineConfig:
    return build_config(
        PipelineConfig,
        None,
        [
            f"data.path={data}",
            f"out={out}",
            "shard=0",
            "num_shards=1",
            "steps=[sample]",
            "sample.n=2",
            "sample.max_new_tokens=4",
            *overrides,
        ],
    )


def _completions(out: Path) -> list[int]:
    rows = read_rows_parquet(out / "sample" / SHARD / "chunk-000000.parquet")
    return [len(r["completions"]) for r in rows]


def test_a_finished_shard_is_reused_only_with_the_same_config_and_input(tmp_path):
    prompts = [{"prompt": p} for p in TASK.prompts("train", 3)]
    data = _write(tmp_path / "prompts.jsonl", prompts)
    out = tmp_path / "gen"
    run_step(_cfg(out, data), "sample", QUIET)
    manifest = out / "sample" / SHARD / "manifest.json"
    first = manifest.read_text()
    assert _completions(out) == [2, 2, 2]

    # The same command again: reused, untouched.
    said = []
    run_step(_cfg(out, data), "sample", said.append)
    assert any("already finished" in s for s in said) and manifest.read_text() == first

    # Another sample.n: it used to print "already finished" and keep the 2 samples per prompt.
    with pytest.raises(ShardError, match=r"was made with another config: sample.n \(2 -> 3\)"):
        run_step(_cfg(out, data, "sample.n=3"), "sample", QUIET)
    with pytest.raises(ShardError, match=r"model \('tiny' -> '.*other'\).*overwrite=true"):
        run_step(_cfg(out, data, f"model.name_or_path={tmp_path / 'other'}"), "sample", QUIET)
    # Another input (a prompt edited, same count): refused too.
    prompts[1]["prompt"] = TASK.prompts("eval", 1)[0]
    _write(tmp_path / "prompts.jsonl", prompts)
    with pytest.raises(ShardError, match=r"input \(the rows this shard reads changed\)"):
        run_step(_cfg(out, data), "sample", QUIET)
    assert manifest.read_text() == first  # every refusal left the shard as it was

    # overwrite=true makes it again, with this run's config and input.
    run_step(_cfg(out, data, "sample.n=3", "overwrite=true"), "sample", QUIET)
    assert _completions(out) == [3, 3, 3]
    saved = json.loads(manifest.read_text())
    assert saved["config"]["sample"]["n"] == 3
    run_step(_cfg(out, data, "sample.n=3"), "sample", QUIET)  # and now it is reused


def _slow_reward(out: Path, data: str, shard: int) -> list[str]:
    return [
        *(sys.executable, "-m", "qrpo.generate.reward", f"data.path={data}", f"out={out}"),
        *(f"shard={shard}", "num_shards=2", "chunk_size=1", "steps=[reward]"),
        "reward.fn=gen_helpers:slow_reward",
    ]


def test_one_process_per_shard_while_other_shards_run(tmp_path):
    texts = [{"text": t} for t in ("1 2", "2 1 3")]
    rows = [{"prompt": p, "responses": texts} for p in TASK.prompts("eval", 6)]
    data = _write(tmp_path / "grouped.jsonl", rows)
    out = tmp_path / "gen"
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}", "OMP_NUM_THREADS": "1"}
    folder = out / "reward" / "shard-00000-of-00002"
    holder = subprocess.Popen(
        _slow_reward(out, data, 0),
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not (folder / "chunk-000000.parquet").exists():
            assert time.time() < deadline and holder.poll() is None, "no first chunk"
            time.sleep(0.01)
        holder.send_signal(signal.SIGSTOP)  # mid-shard, its lock held
        chunks = sorted(p.name for p in folder.iterdir())
        second = subprocess.run(
            _slow_reward(out, data, 0), cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert second.returncode == 2 and "Traceback" not in second.stderr
        last = second.stderr.rstrip().split("\n")[-1]
        assert last.startswith(f"error: {folder} is in use by {holder.pid}@"), last
        assert sorted(p.name for p in folder.iterdir()) == chunks
        # The other shard of the same step and `out`: a legitimate array task, not blocked.
        other = subprocess.run(
            _slow_reward(out, data, 1), cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert other.returncode == 0, other.stderr[-2000:]
        assert (out / "reward" / "shard-00001-of-00002" / "manifest.json").is_file()
    finally:
        holder.kill()
        holder.wait()


def test_one_merge_per_output(tmp_path):
    data = _write(tmp_path / "p.jsonl", [{"prompt": p} for p in TASK.prompts("train", 2)])
    out = tmp_path / "gen"
    run_step(_cfg(out, data), "sample", QUIET)
    merged = out / "sample.parquet"
    with hold_file(merged):
        with pytest.raises(RunLockError, match=f"{merged} is in use by {os.getpid()}@"):
            run_step(_cfg(out, data, "steps=[sample,merge]"), "merge", QUIET)
        assert not merged.exists()
        # In a pipeline of several shards, the task that finds the merge taken leaves it.
        said = []
        cfg = _cfg(out, data, "steps=[sample,merge]", "num_shards=2")
        for shard in (0, 1):
            cfg.shard = shard
            run_pipeline(cfg, said.append)
        assert any(s.startswith("merge: skipped, another task is merging") for s in said)
    run_step(_cfg(out, data, "steps=[sample,merge]"), "merge", QUIET)
    assert merged.is_file()
