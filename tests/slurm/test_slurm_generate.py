"""`python -m qrpo.slurm.generate`: a two-shard job array on the SLURM cluster, then a merge that
depends on it, gives the complete data set, the same as one shard run here."""

import json

import pyarrow.parquet as pq
import pytest
from slurm_helpers import CPU, cli, job_id, wait_gone

from qrpo.common.tiny import TASK

PIPELINE = [
    "chunk_size=2",
    "sample.n=3",
    "sample.max_new_tokens=8",
    "sample.seed=7",
    "reward.fn=task",
    "ref_logps.micro_batch_tokens=512",
]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("slurm-gen") / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in TASK.prompts("train", 6)))
    return str(path)


def test_shard_array_then_merge(slurm_cluster, prompts, tmp_path):
    out = tmp_path / "two"
    sub = cli(
        "qrpo.slurm.generate",
        f"data.path={prompts}",
        f"out={out}",
        *PIPELINE,
        "num_shards=2",
        "partition=debug",
        *CPU,
    )
    shards, merge = job_id(sub, "shards"), job_id(sub, "merge")
    dependency = slurm_cluster.run("scontrol", "show", "job", merge).stdout
    assert f"Dependency=afterok:{shards}" in dependency or "JobState=COMPLETED" in dependency
    # Meanwhile, the one-shard reference, here.
    one = tmp_path / "one"
    cli("qrpo.generate.pipeline", f"data.path={prompts}", f"out={one}", *PIPELINE, "num_shards=1")
    wait_gone(shards)
    wait_gone(merge)

    logs = out / "slurm"
    assert sorted(p.name for p in (out / "sample").iterdir()) == [
        "shard-00000-of-00002",
        "shard-00001-of-00002",
    ]
    assert "shard=0" in (logs / f"{shards}_0_0_log.out").read_text()
    assert "shard=1" in (logs / f"{shards}_1_0_log.out").read_text()
    assert "qrpo.generate.merge" in (logs / f"{merge}_0_log.out").read_text()
    two_rows = pq.read_table(out / "ref_logps.parquet").to_pylist()
    one_rows = pq.read_table(one / "ref_logps.parquet").to_pylist()
    assert len(two_rows) == 6 and sum(len(r["completions"]) for r in two_rows) == 18
    for a, b in zip(one_rows, two_rows, strict=True):
        for ca, cb in zip(a["completions"], b["completions"], strict=True):
            assert abs(ca.pop("ref_logp") - cb.pop("ref_logp")) < 1e-5  # other packing
        assert a == b


def test_bad_generation_config_fails_before_submission(slurm_cluster, prompts, tmp_path):
    before = slurm_cluster.run("squeue", "-h", "-o", "%A").stdout
    common = [f"out={tmp_path / 'never'}", *PIPELINE, *CPU]
    cases = [
        ([f"data.path={prompts}", "num_shards=2", "partition=nope"], "partition='nope'"),
        ([f"data.path={tmp_path / 'none.jsonl'}", "num_shards=2"], "no such file or folder"),
        ([f"data.path={prompts}"], "num_shards=N"),
        ([f"data.path={prompts}", "num_shards=2", "sample.nn=3"], "config key 'sample.nn'"),
    ]
    for args, message in cases:
        out = cli("qrpo.slurm.generate", *common, *args, check=False)
        assert out.returncode == 2 and message in out.stderr, (args, out.stderr)
    assert slurm_cluster.run("squeue", "-h", "-o", "%A").stdout == before
    assert not (tmp_path / "never").exists()
