"""Bad data through the training entry point: one line naming file, row and field as the input
spells them, exit code 2, no traceback, no model loaded, nothing written in the run directory."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MALFORMED = ROOT / "tests" / "assets" / "malformed"

# file, algorithm, where the error must point
CASES = [
    ("pairs_message_without_role.jsonl", "dpo", "row 0, field 'rejected[1].role'"),
    ("pairs_message_without_role.jsonl", "qrpo", "row 0, field 'rejected[1].role'"),
    (
        "grouped_message_without_content.jsonl",
        "qrpo",
        "row 0, field 'responses[1].text[0].content'",
    ),
    ("too_long.jsonl", "sft", "row 1, field 'completion'"),
    ("canonical_inf_ref_logp.jsonl", "qrpo", "row 1, field 'completions[0].ref_logp'"),
    ("ref_index_out_of_range.jsonl", "qrpo", "row 1, field 'ref_index'"),
    ("latin1_prompt.jsonl", "sft", "row 1"),
]


@pytest.mark.parametrize("name,algorithm,where", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_bad_data_stops_the_cli_before_any_model(
    tmp_path, monkeypatch, capsys, name, algorithm, where
):
    import qrpo.train.train as loop
    from qrpo.train.__main__ import main

    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("a model was loaded"))
    run = tmp_path / "run"
    run.mkdir()
    (run / "mine.txt").write_text("already here")
    argv = [
        f"data.path={MALFORMED / name}",
        "data.max_length=16",
        f"loss.algorithm={algorithm}",
        f"run.run_dir={run}",
        "run.global_batch=2",
        "run.micro_batch_tokens=64",
    ]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.rstrip().split("\n")[-1]
    assert last.startswith(f"error: {MALFORMED / name}, {where}: "), last
    assert [p.name for p in run.iterdir()] == ["mine.txt"]


def test_the_issue_case_in_a_fresh_process(tmp_path):
    """A chat message without role in `rejected`, with the shipped DPO config: it used to train
    to the end; now one line, exit 2, and no run directory."""
    run = tmp_path / "run"
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qrpo.train",
            "--config",
            "configs/train/dpo_tiny.yaml",
            "model.name_or_path=tiny",
            f"data.path={MALFORMED / 'pairs_message_without_role.jsonl'}",
            f"run.run_dir={run}",
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.rstrip().split("\n")[-1] == (
        f"error: {MALFORMED / 'pairs_message_without_role.jsonl'}, row 0, field "
        "'rejected[1].role': missing"
    )
    assert not run.exists()
