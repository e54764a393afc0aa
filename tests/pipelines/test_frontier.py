"""A reduced reward-KL frontier (2 curves x 2 betas x 1 seed, tiny sizes) runs end to end: its
table has one row per curve x beta with finite values, every run was evaluated against the same
reference samples, a rerun skips finished runs, and a point added later (trained as a SLURM array
on this machine) is evaluated against those same reference samples."""

import csv
import json
import math
from dataclasses import fields
from pathlib import Path

import pytest

from qrpo.common.config import ConfigError, build_config
from qrpo.pipelines.frontier import FrontierConfig, reference_samples_hash, run
from qrpo.train.config import LossConfig

ROOT = Path(__file__).resolve().parents[2]
SMALL = [
    "seeds=[0]",
    "n_sft=400",
    "sft_epochs=2",
    "n_train=16",
    "k=4",
    "n_eval=6",
    "eval_n=2",
    "epochs=1",
    "global_batch=8",
    "only=[qrpo_identity,dpo]",
    "betas.qrpo_identity=[0.1,1.0]",
    "betas.dpo=[0.1,1.0]",
]


def _config(tmp_path, *extra):
    return build_config(FrontierConfig, None, [f"out={tmp_path}", *SMALL, *extra])


@pytest.mark.slow  # about 90 s on two shared cores: three frontier calls and one SLURM job
def test_reduced_frontier_table_shared_reference_and_resume(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    report = run(_config(tmp_path))

    # --- the table: one row per curve x beta, seeds aggregated, every column finite
    rows = report["rows"]
    assert [(r["curve"], r["beta"]) for r in rows] == [
        ("qrpo_identity", 0.1),
        ("qrpo_identity", 1.0),
        ("dpo", 0.1),
        ("dpo", 1.0),
    ]
    for r in rows:
        assert r["seeds"] == 1 and r["k"] == 4
        for col in ("reward", "reward_gain", "lc_reward", "kl_k3", "kl_k1", "win_rate", "length"):
            assert math.isfinite(r[col]), (r["curve"], r["beta"], col)
        assert r["kl_k3"] >= 0
        assert 0 <= r["reward"] <= 1
    with (tmp_path / "frontier.csv").open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == 1 + len(rows) and table[0]["curve"] == "reference"
    assert {"reward", "reward_se", "lc_reward", "kl_k3", "kl_k3_se"} <= set(table[0])
    saved = json.loads((tmp_path / "frontier.json").read_text())
    assert len(saved["rows"]) == 4 and len(saved["runs"]) == 4
    md = (tmp_path / "frontier.md").read_text()
    assert md.count("| qrpo_identity |") == 2 and md.count("| dpo |") == 2
    assert (tmp_path / "frontier.png").stat().st_size > 10_000

    # --- every run against the same reference samples: one hash, and it is the hash of the
    # reference rows of the evaluation file each run names
    records = [json.loads(p.read_text()) for p in tmp_path.glob("seed0/*/beta*/frontier_eval.json")]
    assert len(records) == 4
    hashes = {r["reference_samples_sha256"] for r in records}
    assert len(hashes) == 1
    recorded = json.loads((tmp_path / "seed0" / "reference_samples.json").read_text())
    assert hashes == {recorded["sha256"]}
    for r in records:
        samples = Path(r["eval_file"]).with_name(Path(r["eval_file"]).stem + "_samples.jsonl")
        assert reference_samples_hash(samples, "reference") == recorded["sha256"]
        assert r["reference"]["mean_reward"] == records[0]["reference"]["mean_reward"]

    # --- a rerun trains and evaluates nothing
    finals = {p: p.stat().st_mtime_ns for p in tmp_path.glob("seed0/*/beta*/final/*.safetensors")}
    evals = sorted((tmp_path / "seed0" / "eval").glob("eval_*.json"))
    again = run(_config(tmp_path))
    assert again["runs_trained"] == 0 and again["runs_skipped"] == 4
    assert {p: p.stat().st_mtime_ns for p in finals} == finals
    assert sorted((tmp_path / "seed0" / "eval").glob("eval_*.json")) == evals
    assert again["rows"] == report["rows"]

    # --- one more point, trained as a job array through qrpo.slurm.train (in this process), then
    # evaluated in a new call whose reference samples must hash the same
    more = _config(
        tmp_path,
        "betas.dpo=[0.1,1.0,0.3]",
        "slurm=true",
        "slurm_args=[cluster=debug,gpus_per_node=0]",
    )
    third = run(more)
    assert third["runs_trained"] == 1 and third["runs_skipped"] == 4
    assert (tmp_path / "slurm").is_dir()
    new = json.loads((tmp_path / "seed0" / "dpo" / "beta0.3" / "frontier_eval.json").read_text())
    assert new["reference_samples_sha256"] == recorded["sha256"]
    assert new["eval_file"] not in {r["eval_file"] for r in records}
    assert [r["beta"] for r in third["rows"] if r["curve"] == "dpo"] == [0.1, 0.3, 1.0]

    # --- reference samples that differ from the seed's recorded ones stop the run, rather than
    # mix runs evaluated against different samples
    record = tmp_path / "seed0" / "reference_samples.json"
    record.write_text(json.dumps({"sha256": "0" * 64, "samples_file": "elsewhere"}))
    (tmp_path / "seed0" / "dpo" / "beta0.3" / "frontier_eval.json").unlink()
    with pytest.raises(RuntimeError, match="differ"):
        run(more)


def test_config_errors_name_the_curve():
    cfg = build_config(FrontierConfig, ROOT / "configs/frontier/qrpo_k.yaml", ["only=[qrpo_k4]"])
    assert [(c.name, c.k, c.data) for c in cfg.active_curves()] == [("qrpo_k4", 4, "pointwise")]
    with pytest.raises(ConfigError, match="only: no curve named"):
        build_config(FrontierConfig, None, ["only=[nope]"])
    with pytest.raises(ConfigError, match="qrpo_identity"):
        build_config(FrontierConfig, None, ["betas.qrpo_identity=[0]"]).active_curves()
    cfg = build_config(FrontierConfig, None, ["partition_curves=true"])
    if "partition" in {f.name for f in fields(LossConfig)}:
        names = [c.name for c in cfg.active_curves()]
        assert {"qrpo_finite_k_k4", "qrpo_empirical_k16"} <= set(names)
    else:
        with pytest.raises(ConfigError, match="loss.partition"):
            cfg.active_curves()


def test_run_folders_keep_close_betas_apart_and_refuse_a_repeat(tmp_path):
    """0.1 and 0.1000001 printed alike with :g and shared a run folder; a repeated beta would
    train one point twice into one folder."""
    from qrpo.evaluate.frontier_report import beta_text
    from qrpo.pipelines.frontier import plan

    cfg = build_config(
        FrontierConfig, None, [f"out={tmp_path}", "only=[dpo]", "betas.dpo=[0.1,0.1000001,1,1e-05]"]
    )
    folders = [spec.run_dir.name for spec in plan(cfg, cfg.active_curves())]
    assert folders[:4] == ["beta0.1", "beta0.1000001", "beta1", "beta1e-05"]
    assert beta_text(3.0) == "3" and beta_text(1 / 3) == repr(1 / 3)
    with pytest.raises(ConfigError, match="curve dpo: beta 0.1 is listed twice"):
        build_config(
            FrontierConfig, None, ["only=[dpo]", "betas.dpo=[0.1,0.3,0.1]"]
        ).active_curves()
