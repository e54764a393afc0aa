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


def _damaged_tiny(folder: Path) -> Path:
    """A real saved tiny model whose model.safetensors is cut in half (an interrupted copy)."""
    import shutil

    from qrpo.common.tiny import ensure_tiny

    shutil.copytree(ensure_tiny(), folder)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    return folder


# (overrides given a tmp folder, the one line expected, start only): every case used to end in
# a traceback (a "Repo id must be in the form" from huggingface_hub, a safetensors error after
# the data was read, a PermissionError after the model had loaded).
PATH_CASES = [
    (
        "missing_model",
        lambda t: [f"model.name_or_path={t / 'runs' / 'sft' / 'final'}"],
        "error: model.name_or_path: model path does not exist: {t}/runs/sft/final",
    ),
    (
        "hub_name_offline",
        lambda t: ["model.name_or_path=nobody-qrpo/not-a-model"],
        "error: model.name_or_path: 'nobody-qrpo/not-a-model' is no local folder, and the hub "
        "is offline (HF_HUB_OFFLINE=1) with no cached copy of it",
    ),
    (
        "missing_ref",
        lambda t: ["ref.source=model", f"ref.name_or_path={t}/ref"],
        "error: ref.name_or_path: model path does not exist: {t}/ref",
    ),
    (
        "truncated_weights",
        lambda t: [f"model.name_or_path={_damaged_tiny(t / 'm')}"],
        "error: model.name_or_path: {t}/m/model.safetensors: truncated or corrupt safetensors "
        "file (its tensors need",
    ),
    (
        # /sys refuses new files even to root, where a chmod-ed folder would not.
        "read_only_run_dir",
        lambda t: ["run.run_dir=/sys/kernel/qrpo_run"],
        "error: run.run_dir: cannot write in /sys/kernel: ",
    ),
]


@pytest.mark.parametrize("name,overrides,expected", PATH_CASES, ids=[c[0] for c in PATH_CASES])
def test_model_and_run_dir_problems_end_in_one_line(tmp_path, name, overrides, expected):
    if name == "read_only_run_dir":
        try:
            Path("/sys/kernel/qrpo_probe").touch()
            pytest.skip("/sys/kernel is writable here")
        except OSError:
            pass
    run = tmp_path / "run"
    # the shipped config starts from runs/demo/sft/final: the tiny model unless a case says
    args = ["model.name_or_path=tiny", f"run.run_dir={run}", *overrides(tmp_path)]
    out = subprocess.run(
        [sys.executable, "-m", "qrpo.train", "--config", "configs/train/qrpo_tiny.yaml", *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(expected.format(t=tmp_path)), lines
    assert not run.exists()
