"""evaluate's inputs and output: the prompt file is checked as training data is, before any
model loads (one line naming file, row and field); one evaluation per results file (real
processes)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qrpo.common.config import exit_on_error
from qrpo.evaluate.__main__ import main

ROOT = Path(__file__).resolve().parents[2]


def _lines(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


BAD_PROMPTS = [
    # Duplicate ids used to be sampled and scored twice; empty prompts sampled and scored 0.
    ([{"prompt": "sort 2 1", "prompt_id": "a"}, {"prompt": "sort 3 1", "prompt_id": "a"}],
     "row 1, field 'prompt_id': duplicate prompt id 'a' (first in row 0)"),
    ([{"prompt": "sort 2 1"}, {"prompt": "sort 3 1"}, {"prompt": "sort 2 1"}],
     "row 2, field 'prompt': duplicate prompt id"),
    ([{"prompt": "sort 2 1"}, {"prompt": "   "}], "row 1, field 'prompt': empty prompt"),
    ([{"prompt": [{"role": "user", "content": ""}]}], "row 0, field 'prompt': empty prompt"),
    ([{"prompt": [{"content": "hi"}]}], "row 0, field 'prompt[0].role': missing"),
    ([{"text": "sort 2 1"}], "row 0, field 'prompt': missing"),
    (["[1, 2]"], "row 0: expected an object, got list"),
    (['{"prompt": "a"', '{"prompt": "b"}'], "row 0: invalid JSON on line 1"),
]  # fmt: skip


@pytest.mark.parametrize("rows,where", BAD_PROMPTS)
def test_a_bad_prompt_file_is_one_line_before_any_model(tmp_path, monkeypatch, capsys, rows, where):
    import qrpo.evaluate.evaluate as ev

    def no_model(*args, **kwargs):
        raise AssertionError("a model or reward was loaded before the prompts were checked")

    for name in ("load_model", "load_tokenizer", "load_reward"):
        monkeypatch.setattr(ev, name, no_model)
    path = _lines(tmp_path / "held_out.jsonl", rows)
    out = tmp_path / "eval" / "eval.json"
    with pytest.raises(SystemExit) as info:
        exit_on_error(main, ["models=[tiny]", f"prompts={path}", f"out={out}"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {path}, {where}"), err
    assert not out.parent.exists()  # nothing written


def _evaluate_cmd(out: Path) -> list[str]:
    return [
        *(sys.executable, "-m", "qrpo.evaluate", "models=[tiny,tiny]", f"out={out}"),
        *("n_prompts=32", "n=8", "max_new_tokens=24", "plots=false"),
    ]


def test_a_second_evaluation_into_the_same_file_refuses(tmp_path):
    out = tmp_path / "eval.json"
    lock = tmp_path / "eval.json.lock"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    holder = subprocess.Popen(
        _evaluate_cmd(out), cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.time() + 120
        while not (lock.is_file() and lock.read_text().strip()):
            assert time.time() < deadline and holder.poll() is None, "the lock was never taken"
            time.sleep(0.005)
        holder.send_signal(signal.SIGSTOP)  # sampling, its lock held
        assert holder.poll() is None and not out.exists()
        second = subprocess.run(
            _evaluate_cmd(out), cwd=ROOT, env=env, capture_output=True, text=True
        )
        assert second.returncode == 2 and "Traceback" not in second.stderr
        last = second.stderr.rstrip().split("\n")[-1]
        assert last.startswith(f"error: {out} is in use by {holder.pid}@"), last
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
