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


# --------------------------------------------------------------------------- numbers


def _other(module: str, name: str):
    def tree():
        import importlib

        return getattr(importlib.import_module(module), name)

    return tree


# (config tree, override, the dotted key the error must name): every tree with float keys,
# and numbers inside lists and dicts, which no type check reaches.
NONFINITE = [
    (_train_cfg, "optim.lr=inf", "optim.lr"),
    (_train_cfg, "loss.beta=nan", "loss.beta"),
    (_train_cfg, "optim.eps=-inf", "optim.eps"),
    (_train_cfg, "ref.check_tolerance=nan", "ref.check_tolerance"),
    (_train_cfg, "loss.kto_threshold=inf", "loss.kto_threshold"),
    (_train_cfg, "optim.betas=[0.9,.nan]", "optim.betas[1]"),
    (_pipeline_cfg, "sample.temperature=nan", "sample.temperature"),
    (_pipeline_cfg, "reward.sandbox.wall_seconds=inf", "reward.sandbox.wall_seconds"),
    (_eval_cfg, "top_p=nan", "top_p"),
    (_slurm_cfg, "env.X=.inf", "env.X"),
    (_other("qrpo.pipelines.frontier", "FrontierConfig"), "betas.dpo=[.nan]", "betas.dpo[0]"),
    (
        _other("qrpo.pipelines.frontier", "FrontierConfig"),
        "curves=[{name: a, betas: [.inf]}]",
        "curves[0].betas[0]",
    ),
    (_other("qrpo.evaluate.partition_bandit", "BanditConfig"), "beta=nan", "beta"),
    (_other("qrpo.train.bench_workload", "BenchConfig"), "lr=inf", "lr"),
    (_other("qrpo.pipelines.demo", "DemoConfig"), "qrpo_beta=nan", "qrpo_beta"),
]


@pytest.mark.parametrize("tree,override,key", NONFINITE, ids=[n[1] for n in NONFINITE])
def test_non_finite_numbers_are_refused_with_their_key(tree, override, key):
    extra = ["models=[tiny]"] if tree is _eval_cfg else []
    with pytest.raises(ConfigError) as info:
        build_config(tree(), None, [*extra, override])
    assert str(info.value).startswith(f"command line: config key '{key}': not finite: ")


# Keys with a natural range; each value used to pass (NaN-unsafe `x <= 0`, or no check).
OUT_OF_RANGE = [
    (_train_cfg, "optim.lr=0", "optim.lr': must be > 0, got 0"),
    (_train_cfg, "optim.eps=-1e-8", "optim.eps': must be >= 0"),
    (_train_cfg, "optim.weight_decay=-0.1", "optim.weight_decay': must be >= 0"),
    (_train_cfg, "optim.betas=[0.9,1.0]", "optim.betas[1]': must be >= 0 and < 1, got 1.0"),
    (_train_cfg, "optim.betas=[0.9,nan]", "optim.betas[1]': not a number: 'nan'"),
    (_train_cfg, "loss.tau=0", "loss.tau': must be > 0"),
    (_train_cfg, "ref.check_rows=0", "ref.check_rows': must be >= 1"),
    (_pipeline_cfg, "sample.vllm_memory=1.5", "sample.vllm_memory': must be > 0 and <= 1"),
    (_eval_cfg, "temperature=-1", "temperature': must be >= 0"),
]


@pytest.mark.parametrize("tree,override,words", OUT_OF_RANGE, ids=[o[1] for o in OUT_OF_RANGE])
def test_out_of_range_numbers_are_refused_with_their_key(tree, override, words):
    extra = ["models=[tiny]"] if tree is _eval_cfg else []
    with pytest.raises(ConfigError, match="config key '" + words.replace("[", r"\[")):
        build_config(tree(), None, [*extra, override])


def test_post_init_checks_and_python_built_trees_refuse_nan():
    # Trees made in Python skip build_config: their own checks must fail NaN too.
    from qrpo.common.sampling import SamplingConfig
    from qrpo.pipelines.frontier import CurveConfig
    from qrpo.train.config import LossConfig, OptimConfig, TrainConfig

    nan = float("nan")
    for make in (
        lambda: LossConfig(beta=nan),
        lambda: OptimConfig(lr=nan),
        lambda: SamplingConfig(temperature=nan).check_sampling(),
        lambda: CurveConfig(name="a", betas=[0.1, nan]),
    ):
        with pytest.raises(ConfigError):
            make()
    tree = TrainConfig()
    tree.loss.gamma = float("inf")
    with pytest.raises(ConfigError, match="config key 'loss.gamma': not finite: inf"):
        check_choices(tree)


def test_a_non_finite_lr_ends_the_train_command_in_one_line(tmp_path):
    """`optim.lr=inf` used to train to the end and save an all-NaN model."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = tmp_path / "run"
    out = subprocess.run(
        [sys.executable, "-m", "qrpo.train", "optim.lr=inf", f"run.run_dir={run}"],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    assert out.stderr.strip().splitlines() == [
        "python -m qrpo.train: error: command line: config key 'optim.lr': not finite: inf"
    ]
    assert not run.exists()
