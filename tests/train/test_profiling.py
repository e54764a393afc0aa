"""run.profile_steps writes the top operators of a window of steps; a run's saved config.yaml
is a complete config that another run can start from (what .ci/gpu does)."""

import json
import random

import pytest

from qrpo.common.config import ConfigError, build_config
from qrpo.common.tiny import TASK
from qrpo.train.config import TrainConfig
from qrpo.train.train import train


def _data(path):
    rng = random.Random(0)
    rows = []
    for prompt in TASK.prompts("train", 16):
        text = TASK.demonstration(prompt, rng, noise=0.5)
        rows.append({"prompt": prompt, "completion": text, "reward": TASK.reward(prompt, text)})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_profile_window_from_a_saved_config(tmp_path):
    first = tmp_path / "first"
    base = [
        f"data.path={_data(tmp_path / 'd.jsonl')}",
        "loss.algorithm=sft",
        "run.global_batch=4",
        "data.max_length=64",
        "run.micro_batch_tokens=512",
        "run.max_steps=1",
        "run.peak_tflops=1.0",
        "run.trackers=[]",
        "run.plot=false",
        f"run.run_dir={first}",
    ]
    train(build_config(TrainConfig, None, base))
    assert not list(first.glob("profile_rank*.txt"))  # off by default

    second = tmp_path / "second"
    overrides = [f"run.run_dir={second}", "run.max_steps=3", "run.profile_steps=[2,3]"]
    train(build_config(TrainConfig, str(first / "config.yaml"), overrides))
    text = (second / "profile_rank0.txt").read_text()
    assert text.startswith("steps 2..3") and "aten::" in text
    steps = [
        json.loads(line)["step"] for line in (second / "metrics.jsonl").read_text().splitlines()
    ]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("window", [[0, 2], [3, 2], [1]])
def test_profile_window_is_checked(window):
    with pytest.raises(ConfigError, match="profile_steps"):
        build_config(TrainConfig, None, [f"run.profile_steps={window}"])
