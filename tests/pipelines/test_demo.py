"""A reduced version of the README's first command runs end to end and writes its outputs."""

import json

from qrpo.common.config import build_config
from qrpo.pipelines.demo import DemoConfig, run


def test_reduced_demo_runs_the_whole_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(__import__("pathlib").Path(__file__).resolve().parents[2])
    cfg = build_config(
        DemoConfig,
        None,
        [
            f"out={tmp_path}",
            "n_sft=600",
            "sft_epochs=2",
            "n_train=32",
            "k=4",
            "n_eval=8",
            "epochs=1",
            "global_batch=4",
        ],
    )
    results = run(cfg)
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved and results
    table = (tmp_path / "eval.md").read_text()
    for name in ("sft", "qrpo", "dpo"):
        assert f"| {name} |" in table
        assert (tmp_path / name / "final" / "model.safetensors").is_file()
    assert (tmp_path / "generate" / "pointwise" / "ref_logps.parquet").is_file()
    assert (tmp_path / "generate" / "pairs" / "ref_logps.parquet").is_file()
    assert list(tmp_path.glob("*.png"))
    assert (tmp_path / "qrpo" / "training_curves.png").is_file()
