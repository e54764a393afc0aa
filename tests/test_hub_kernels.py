"""Hugging Face's `kernels` distribution (a dependency of transformers since 5.25) and ours.

transformers imports `kernels` when it loads a model. Our package once had a top-level `kernels/`
that shadowed it from the repository root; now everything is under `qrpo`, and every
`from_pretrained` of ours passes `use_kernels=` from the config (off by default), so no layer is
swapped for code downloaded at load time.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qrpo.common.model import ModelConfig, load_model
from qrpo.common.rewards import RewardConfig

ROOT = Path(__file__).resolve().parents[1]

LOAD = """
import importlib.util, sys
import transformers.integrations.hub_kernels  # imports `kernels` when that distribution is there
from qrpo.common.model import ModelConfig, load_model
spec = importlib.util.find_spec("kernels")
print("kernels from:", spec.origin if spec else None)
model = load_model(ModelConfig(), "cpu", log=lambda *_: None)
print("use_kernels:", model.use_kernels, "sys.path[0]:", repr(sys.path[0]))
"""


@pytest.mark.parametrize("where", ["repo root", "another folder"])
def test_a_model_loads_from_the_repo_root_and_elsewhere(tmp_path, where):
    cwd = ROOT if where == "repo root" else tmp_path
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    env.pop("USE_HUB_KERNELS", None)  # transformers' default: kernels on unless we say otherwise
    out = subprocess.run(
        [sys.executable, "-c", LOAD], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-3000:]
    origin = out.stdout.split("kernels from:")[1].split("\n")[0].strip()
    # Whatever `kernels` is (Hugging Face's, or none), it is never a folder of this repository.
    assert origin == "None" or not Path(origin).resolve().is_relative_to(ROOT), origin
    assert "use_kernels: False" in out.stdout
    assert "sys.path[0]: ''" in out.stdout  # -c puts the working folder first, as python -m does


def _spy_from_pretrained(monkeypatch, cls) -> list[dict]:
    """Record the keyword arguments of `cls.from_pretrained`, then load for real."""
    calls: list[dict] = []
    real = cls.from_pretrained.__func__

    def spy(klass, *args, **kwargs):
        calls.append(kwargs)
        return real(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    return calls


@pytest.mark.parametrize("hub_kernels", [False, True])
def test_model_hub_kernels_is_passed_as_use_kernels(monkeypatch, hub_kernels):
    from transformers import AutoModelForCausalLM

    # The environment switch keeps a `True` from fetching anything here: transformers then
    # disables kernels itself, after receiving what we passed.
    monkeypatch.setenv("USE_HUB_KERNELS", "NO")
    calls = _spy_from_pretrained(monkeypatch, AutoModelForCausalLM)
    load_model(ModelConfig(hub_kernels=hub_kernels), "cpu", log=lambda *_: None)
    assert [c.get("use_kernels") for c in calls] == [hub_kernels]


def test_reward_model_hub_kernels_default_off(monkeypatch, tmp_path):
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        LlamaForSequenceClassification,
    )

    from qrpo.common.reward_model import RewardModel
    from qrpo.common.tiny import ensure_tiny, model_config

    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(model_config(len(tok), num_labels=1))
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    calls = _spy_from_pretrained(monkeypatch, AutoModelForSequenceClassification)
    scorer = RewardModel(RewardConfig(fn="model", model=str(tmp_path / "rm"), device="cpu"))
    assert [c.get("use_kernels") for c in calls] == [False]
    assert scorer.model.use_kernels is False
