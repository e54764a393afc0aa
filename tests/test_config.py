"""The typed config system: YAML + dotted overrides, errors that name the key, --help."""

from dataclasses import dataclass
from typing import Optional

import pytest

from qrpo.common.config import ConfigError, build_config, doc, save_config, sub


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


def test_every_shipped_yaml_loads():
    from pathlib import Path

    from qrpo.train.config import TrainConfig

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


# --------------------------------------------------------------------------- choices

from qrpo.common.config import check_choices, choice  # noqa: E402


@dataclass
class _Loss:
    transform: str = choice("identity", ("identity", "log", "sqrt"), "f(q)")
    steps: list = choice(["a"], ("a", "b"), "steps")


@dataclass
class _Tree:
    loss: _Loss = sub(_Loss, "loss")


def test_choice_errors_list_values_and_suggest_the_nearest(tmp_path):
    assert build_config(_Tree, None, ["loss.transform=sqrt"]).loss.transform == "sqrt"
    with pytest.raises(ConfigError) as info:
        build_config(_Tree, None, ["loss.transform=sqrtt"])
    assert str(info.value) == (
        "command line: config key 'loss.transform': 'sqrtt' is not one of identity, log, sqrt; "
        "did you mean 'sqrt'?"
    )
    with pytest.raises(ConfigError, match=r"'cube' is not one of identity, log, sqrt$"):
        build_config(_Tree, None, ["loss.transform=cube"])  # nothing near: no suggestion
    (tmp_path / "c.yaml").write_text("loss:\n  steps: [a, c]\n")
    with pytest.raises(ConfigError, match=r"c.yaml: config key 'loss.steps\[1\]': 'c' is not one"):
        build_config(_Tree, tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match="2 keys have values not allowed") as info:
        build_config(_Tree, tmp_path / "c.yaml", ["loss.transform=LOG"])
    assert "did you mean 'log'?" in str(info.value)
    from qrpo.common.config import config_help

    assert "  loss.transform: str = 'identity'  # f(q) {identity | log | sqrt}" in config_help(
        _Tree
    )
    tree = _Tree()
    tree.loss.transform = "cube"
    with pytest.raises(ConfigError, match="'loss.transform'"):
        check_choices(tree)


def _train_cfg():
    from qrpo.train.config import TrainConfig

    return TrainConfig


def _pipeline_cfg():
    from qrpo.generate.config import PipelineConfig

    return PipelineConfig


def _eval_cfg():
    from qrpo.evaluate.evaluate import EvalConfig

    return EvalConfig


def _slurm_cfg():
    from qrpo.slurm.config import SlurmConfig

    return SlurmConfig


# (config tree, key, a wrong value, the suggestion expected or None)
CHOICE_KEYS = [
    (_train_cfg, "loss.algorithm", "dpoo", "dpo"),
    (_train_cfg, "loss.transform", "cube", None),
    (_train_cfg, "loss.estimator", "median", "midrank"),
    (_train_cfg, "loss.loss_type", "huber", None),
    (_train_cfg, "loss.kernel_backend", "triton2", "triton"),
    (_train_cfg, "ref.source", "dataa", "data"),
    (_train_cfg, "model.attn_implementation", "flash", "flash_attention_2"),
    (_train_cfg, "model.dtype", "bf16", "bfloat16"),
    (_train_cfg, "data.format", "pair", "pairs"),
    (_train_cfg, "data.too_long", "truncate", None),
    (_train_cfg, "optim.scheduler", "cosin", "cosine"),
    (_train_cfg, "run.mixed_precision", "bfloat16", "bf16"),
    (_train_cfg, "run.resume", "forced", "force"),
    (_pipeline_cfg, "sample.backend", "vlm", "vllm"),
    (_pipeline_cfg, "reward.truncation_side", "middle", None),
    (_pipeline_cfg, "reward.dtype", "float64", "float16"),
    (_pipeline_cfg, "build.regime", "bestworst", "best_worst"),
    (_pipeline_cfg, "ref_logps.kernel_backend", "cuda", None),
    (_pipeline_cfg, "ref_logps.mixed_precision", "fp8", None),
    (_eval_cfg, "reward.fn", "modle", "model"),
    (_eval_cfg, "reward.sandbox.isolation", "none", None),
    (_eval_cfg, "length_unit", "token", "tokens"),
    (_eval_cfg, "kernel_backend", "tritonn", "triton"),
    (_slurm_cfg, "cluster", "loca", "local"),
]


@pytest.mark.parametrize(
    "tree,key,value,near", CHOICE_KEYS, ids=[f"{k}={v}" for _, k, v, _ in CHOICE_KEYS]
)
def test_every_fixed_choice_key_is_checked_when_built(tree, key, value, near):
    extra = ["models=[tiny]"] if tree is _eval_cfg else []
    with pytest.raises(ConfigError) as info:
        build_config(tree(), None, [*extra, f"{key}={value}"])
    message = str(info.value)
    assert f"config key '{key}': '{value}' is not one of" in message, message
    assert ("did you mean" in message) == (near is not None), message
    if near:
        assert message.endswith(f"did you mean '{near}'?")


def _exit_message(capsys, main, argv) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    out = capsys.readouterr()
    assert "Traceback" not in out.err
    return out.err


def test_every_script_checks_choices_before_its_work(capsys, tmp_path):
    from qrpo.evaluate.__main__ import main as evaluate_main
    from qrpo.generate.pipeline import main as pipeline_main
    from qrpo.slurm.train import main as slurm_train
    from qrpo.train.__main__ import main as train_main

    run = tmp_path / "run"
    err = _exit_message(capsys, train_main, [f"run.run_dir={run}", "loss.transform=cube"])
    assert "config key 'loss.transform': 'cube' is not one of identity, log" in err
    err = _exit_message(capsys, pipeline_main, [f"out={run}", "build.regime=bestworst"])
    assert "'build.regime': 'bestworst' is not one of" in err
    err = _exit_message(capsys, evaluate_main, ["models=[tiny]", "reward.fn=modle"])
    assert "did you mean 'model'?" in err
    # The launcher, before it writes or submits anything, for every point of a sweep.
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b", "reward": 1.0}\n')
    args = [f"data.path={data}", f"run.run_dir={run}", "cluster=local", "gpus_per_node=0"]
    err = _exit_message(capsys, slurm_train, [*args, "sweep.loss.estimator=[inclusive,median]"])
    assert "'loss.estimator': 'median' is not one of" in err
    assert not run.exists()
