"""The typed config system: YAML + dotted overrides, errors that name the key, --help."""

import subprocess
import sys
from dataclasses import dataclass
from typing import Optional

import pytest

from common.config import ConfigError, build_config, doc, save_config, sub


@dataclass
class _Optim:
    lr: float = doc(1e-3, "learning rate")
    betas: list = doc([0.9, 0.95], "Adam betas")

    def __post_init__(self):
        if self.lr <= 0:
            raise ConfigError("optim.lr must be > 0")


@dataclass
class _Cfg:
    optim: _Optim = sub(_Optim, "optimizer")
    steps: int = doc(10, "steps")
    name: Optional[str] = doc(None, "run name")


def test_yaml_then_overrides(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("steps: 5\noptim:\n  lr: 0.5\n")
    cfg = build_config(_Cfg, path, ["optim.lr=0.25", "--name=x"])
    assert (cfg.steps, cfg.optim.lr, cfg.name, cfg.optim.betas) == (5, 0.25, "x", [0.9, 0.95])
    again = build_config(_Cfg, save_config(cfg, tmp_path / "run"))
    assert again == cfg


@pytest.mark.parametrize(
    "source,override,words",
    [
        ("yaml", "optim:\n  lrr: 1\n", "config key 'optim.lrr'"),
        ("yaml", "stepz: 1\n", "config key 'stepz'"),
        ("cli", "optim.lrr=1", "config key 'optim.lrr'"),
        ("cli", "optim.lr=abc", "config key 'optim.lr'"),
        ("cli", "steps=1.5", "config key 'steps'"),
        ("cli", "optim.lr=-1", "optim.lr must be > 0"),
    ],
)
def test_unknown_or_mistyped_keys_are_named(tmp_path, source, override, words):
    with pytest.raises(ConfigError, match=words):
        if source == "yaml":
            (tmp_path / "c.yaml").write_text(override)
            build_config(_Cfg, tmp_path / "c.yaml")
        else:
            build_config(_Cfg, None, [override])


@pytest.mark.parametrize("module", ["train", "generate", "evaluate", "slurm"])
def test_entry_points_have_help(module):
    out = subprocess.run(
        [sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "configuration keys" in out.stdout and "--config" in out.stdout


def test_every_shipped_yaml_loads():
    from pathlib import Path

    from train.config import TrainConfig

    files = sorted(Path("configs/train").glob("*.yaml"))
    assert files
    for f in files:
        build_config(TrainConfig, f)


def test_every_accelerate_config_loads():
    from pathlib import Path

    from accelerate.commands.config.config_args import load_config_from_file

    kinds = {}
    for f in sorted(Path("configs/accelerate").glob("*.yaml")):
        cfg = load_config_from_file(str(f))
        kinds[f.stem] = (cfg.distributed_type.value, (cfg.fsdp_config or {}).get("fsdp_version"))
    assert kinds["fsdp2_multi_gpu"] == ("FSDP", 2)
    assert kinds["fsdp2_multi_node"] == ("FSDP", 2)
    assert kinds["single_gpu"][0] == "NO"
