"""The sharded pipeline on the tiny model: shards agree with one shard, a killed shard resumes
without redoing chunks, merge refuses incomplete or duplicated shards, the reference log-probs
are the training loop's own, and the three data formats flow through into training rows."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from qrpo.common.config import build_config
from qrpo.common.tiny import TASK
from qrpo.generate.config import PipelineConfig
from qrpo.generate.merge import MergeError
from qrpo.generate.pipeline import run_pipeline, run_step
from qrpo.generate.shards import read_rows_parquet, write_rows_parquet
from qrpo.kernels.sequence_model import SequenceLogprobModel, sequence_logps
from qrpo.train.config import TrainConfig
from qrpo.train.train import load_examples, train

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
QUIET = lambda *_: None  # noqa: E731


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
            "chunk_size=2",
            "sample.n=3",
            "sample.max_new_tokens=8",
            "sample.seed=7",
            "reward.fn=gen_helpers:length_reward",
            "ref_logps.micro_batch_tokens=512",
            *overrides,
        ],
    )


def _read(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("prompts")
    return _write(d / "prompts.jsonl", [{"prompt": p} for p in TASK.prompts("train", 6)])


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory, prompts) -> Path:
    out = tmp_path_factory.mktemp("one")
    run_pipeline(_cfg(out, prompts), QUIET)
    return out


def _train_cfg(tmp: Path, data: str, algorithm: str, *overrides: str) -> TrainConfig:
    return build_config(
        TrainConfig,
        None,
        [
            f"data.path={data}",
            "data.max_length=64",
            f"loss.algorithm={algorithm}",
            "loss.beta=0.3",
            f"run.run_dir={tmp}",
            "run.trackers=[]",
            "run.plot=false",
            "run.global_batch=4",
            "run.micro_batch_tokens=512",
            "run.peak_tflops=1.0",
            "run.max_steps=1",
            "optim.lr=1e-3",
            *overrides,
        ],
    )


# --------------------------------------------------------------------------- sharding


def test_two_shards_give_the_one_shard_result(tmp_path, prompts, one_shard):
    # Other shard count, chunk size and generate() batch size: the same samples, rewards, ids.
    for shard in (0, 1):
        cfg = _cfg(tmp_path, prompts, f"shard={shard}", "num_shards=2", "chunk_size=1")
        cfg.sample.batch_size = 2
        run_pipeline(cfg, QUIET)
    shards = [p.name for p in (tmp_path / "sample").iterdir()]
    assert sorted(shards) == ["shard-00000-of-00002", "shard-00001-of-00002"]
    one, two = _read(one_shard / "ref_logps.parquet"), _read(tmp_path / "ref_logps.parquet")
    assert len(one) == 6 and sum(len(r["completions"]) for r in one) == 18
    for a, b in zip(one, two, strict=True):
        for ca, cb in zip(a["completions"], b["completions"], strict=True):
            assert abs(ca.pop("ref_logp") - cb.pop("ref_logp")) < 1e-5  # other packing
        assert a == b
    assert len({x for r in one for x in r["ref_rewards"]}) > 1  # the rewards vary
    # Each step's manifest has the counts and reward statistics of its shard.
    manifest = json.loads(
        (tmp_path / "reward" / "shard-00001-of-00002" / "manifest.json").read_text()
    )
    assert manifest["summary"]["prompts"] == 3 and manifest["summary"]["reward"]["count"] == 9
    assert [len(c["prompt_ids"]) for c in manifest["chunks"]] == [1, 1, 1]


def test_killed_shard_resumes_without_redoing_chunks(tmp_path, prompts):
    env = {
        **os.environ,
        "PYTHONPATH": f"{ROOT}{os.pathsep}{HERE}",
        "OMP_NUM_THREADS": "1",
        "SLURM_ARRAY_TASK_ID": "5",  # overridden by shard=0 num_shards=1 below
        "SLURM_ARRAY_TASK_COUNT": "9",
    }
    args = [
        sys.executable,
        "-m",
        "qrpo.generate.pipeline",
        f"data.path={prompts}",
        f"out={tmp_path}",
        "shard=0",
        "num_shards=1",
        "chunk_size=1",
        "steps=[sample,reward,merge]",
        "sample.n=2",
        "sample.max_new_tokens=8",
        "reward.fn=gen_helpers:slow_reward",  # 0.3 s per chunk
    ]
    folder = tmp_path / "reward" / "shard-00000-of-00001"
    proc = subprocess.Popen(
        args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 120
    while not (folder / "chunk-000000.parquet").exists():
        assert time.time() < deadline and proc.poll() is None, "no first chunk"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(folder.glob("chunk-*.parquet"))
    assert 1 <= len(done) < 6 and not (folder / "manifest.json").exists()
    mtimes = {p.name: p.stat().st_mtime_ns for p in done}

    out = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "sample shard-00000-of-00001: already finished" in out.stdout
    for name in mtimes:
        assert f"reward shard-00000-of-00001: {name} already done, skipped" in out.stdout
    assert {p.name: p.stat().st_mtime_ns for p in done} == mtimes  # not rewritten
    assert not list(folder.glob("*.tmp-*"))
    rows = _read(tmp_path / "reward.parquet")
    ids = [c["completion_id"] for r in rows for c in r["completions"]]
    assert len(rows) == 6 and len(ids) == 12 == len(set(ids))
    from gen_helpers import length_score

    for r in rows:
        assert r["ref_rewards"] == [length_score(c["text"]) for c in r["completions"]]


def _copy_step(src: Path, dst: Path, step: str) -> Path:
    shutil.copytree(src / step, dst / step)
    return dst


def test_merge_names_missing_and_duplicated_and_writes_nothing(tmp_path, prompts):
    for shard in (0, 1):
        cfg = _cfg(tmp_path / "src", prompts, f"shard={shard}", "num_shards=2", "steps=[sample]")
        run_pipeline(cfg, QUIET)

    def merge(out: Path, *extra: str) -> Path:
        cfg = _cfg(out, prompts, "steps=[sample,merge]", "num_shards=0", *extra)
        return run_step(cfg, "merge", QUIET)

    # A missing chunk, named; nothing written unless allow_partial.
    out = _copy_step(tmp_path / "src", tmp_path / "a", "sample")
    lost = out / "sample" / "shard-00001-of-00002" / "chunk-000001.parquet"
    lost_rows = len(read_rows_parquet(lost))
    lost.unlink()
    with pytest.raises(MergeError, match=f"missing chunk {lost}"):
        merge(out)
    assert not (out / "sample.parquet").exists()
    partial = merge(out, "merge.allow_partial=true")
    assert len(_read(partial)) == 6 - lost_rows

    # A prompt duplicated into another shard's chunk, named with both files.
    out = _copy_step(tmp_path / "src", tmp_path / "b", "sample")
    first = out / "sample" / "shard-00000-of-00002" / "chunk-000000.parquet"
    other = read_rows_parquet(out / "sample" / "shard-00001-of-00002" / "chunk-000000.parquet")
    write_rows_parquet(read_rows_parquet(first) + other[:1], first)
    with pytest.raises(MergeError) as info:
        merge(out)
    assert f"duplicate prompt id '{other[0]['prompt_id']}'" in str(info.value)
    assert not (out / "sample.parquet").exists()

    # A completion id given to two prompts.
    out = _copy_step(tmp_path / "src", tmp_path / "d", "sample")
    rows = read_rows_parquet(
        first := out / "sample" / "shard-00000-of-00002" / "chunk-000000.parquet"
    )
    taken = other[0]["completions"][1]["completion_id"]
    rows[0]["completions"][0]["completion_id"] = taken
    write_rows_parquet(rows, first)
    with pytest.raises(MergeError, match=f"duplicate completion id '{taken}'"):
        merge(out)
    assert not (out / "sample.parquet").exists()

    # A shard that never ran.
    out = _copy_step(tmp_path / "src", tmp_path / "c", "sample")
    shutil.rmtree(out / "sample" / "shard-00000-of-00002")
    with pytest.raises(MergeError, match="missing shard 0"):
        merge(out, "num_shards=2")
    assert not (out / "sample.parquet").exists()


# --------------------------------------------------------------------------- reference log-probs


def test_ref_logps_equal_the_training_loops_step_zero(tmp_path, one_shard):
    from qrpo.common.model import load_model

    data = str(one_shard / "ref_logps.parquet")
    # The loop's own values at step 0, from its own examples.
    cfg = _train_cfg(tmp_path / "x", data, "qrpo")
    examples, _ = load_examples(cfg)
    policy = SequenceLogprobModel(load_model(cfg.model, log=QUIET), "auto").eval()
    ours = torch.tensor([s.ref_logp for e in examples for s in e.sequences])
    loop = sequence_logps(policy, examples, cfg.run.micro_batch_tokens, "cpu")
    assert len(ours) == 18
    torch.testing.assert_close(ours, loop, rtol=0, atol=1e-5)

    # Training from them passes the loop's step-0 check at 1e-5 on every row, and its first
    # loss is the one of a run whose reference model runs on the fly.
    pre = _train_cfg(tmp_path / "data", data, "qrpo", "ref.source=data", "ref.check_rows=100")
    pre.ref.check_tolerance = 1e-5
    fly = _train_cfg(tmp_path / "model", data, "qrpo", "ref.source=model")
    train(pre)
    train(fly)
    losses = [
        json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])["loss"]
        for name in ("data", "model")
    ]
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)


# --------------------------------------------------------------------------- the three formats


def test_grouped_pairs_and_pointwise_inputs_become_training_rows(tmp_path):
    chats = TASK.prompts("eval", 3)
    grouped = _write(
        tmp_path / "grouped.jsonl",
        [
            {
                "prompt": p,
                "responses": [{"text": t, "reward": 0.0} for t in ("1 2", "2 1 3", "0")],
            }
            for p in chats
        ],
    )
    pairs = _write(
        tmp_path / "pairs.jsonl",
        [
            {"prompt": chats[0], "chosen": "1 2", "rejected": "2 1"},
            {"prompt": chats[1], "chosen": "3 4", "rejected": "4"},
            {"prompt": chats[0], "chosen": "1 2", "rejected": "2 2 2"},  # same prompt again
        ],
    )
    pointwise = _write(
        tmp_path / "pointwise.jsonl",
        [
            {"prompt": "sort 3 1 2", "completion": "1 2 3", "reward": 1.0},
            {"prompt": "sort 3 1 2", "completion": "3 2 1", "reward": 0.0},
            {"prompt": "sort 5 4", "completion": "4 5", "reward": 1.0},
        ],
    )

    # grouped: the responses are the reference samples; rescored, each row pointwise.
    out = tmp_path / "g"
    run_pipeline(
        _cfg(out, grouped, "steps=[reward,build,ref_logps,merge]", "reward.fn=task"), QUIET
    )
    examples, _ = load_examples(_train_cfg(out / "run", str(out / "ref_logps.parquet"), "qrpo"))
    seqs = [s for e in examples for s in e.sequences]
    assert len(seqs) == 9 and [s.ref_index for s in seqs[:3]] == [0, 1, 2]
    expected = [TASK.reward(chats[0], t) for t in ("1 2", "2 1 3", "0")]
    assert seqs[0].ref_rewards == pytest.approx(expected) and all(s.ref_logp < 0 for s in seqs)

    # pairs: sampled references, the data's own pairs kept (both pairs of the repeated prompt).
    out = tmp_path / "p"
    run_pipeline(_cfg(out, pairs, "sample.n=2", "build.regime=offline"), QUIET)
    examples, _ = load_examples(_train_cfg(out / "run", str(out / "ref_logps.parquet"), "dpo"))
    assert len(examples) == 3
    chosen = examples[0].sequences[0]
    assert len(chosen.ref_rewards) == 2 and chosen.ref_index == -1 and chosen.ref_logp < 0
    rows = _read(out / "ref_logps.parquet")
    assert [r["source_row"] for r in rows] == [0, 0, 1]
    assert len({c["completion_id"] for r in rows for c in r["completions"]}) == 6

    # pointwise: one group per prompt; best and worst of 4 reference samples.
    out = tmp_path / "w"
    run_pipeline(
        _cfg(
            out,
            pointwise,
            "sample.n=4",
            "build.regime=best_worst",
            "steps=[sample,reward,build,merge]",
        ),
        QUIET,
    )
    rows = _read(out / "build.parquet")
    assert 1 <= len(rows) <= 2 and all(len(r["ref_rewards"]) == 4 for r in rows)
    examples, _ = load_examples(_train_cfg(out / "run", str(out / "build.parquet"), "dpo"))
    best, worst = examples[0].sequences
    assert best.reward > worst.reward and best.ref_index >= 0 and worst.ref_index >= 0
