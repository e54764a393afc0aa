"""The launcher without a cluster: command-line routing, --help, dry runs, the per-node commands,
the rendezvous port, time formats and the sweep grid."""

import types

import pytest
from slurm_helpers import CPU, cli

from qrpo.common.config import ConfigError
from qrpo.slurm.config import SlurmConfig, parse_launch_args, time_minutes
from qrpo.slurm.job import rendezvous_port
from qrpo.slurm.sweep import grid_points
from qrpo.slurm.train import TrainJob


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "sft.jsonl"
    path.write_text('{"prompt": "sort 2 1", "completion": "1 2", "reward": 1.0}\n')
    return path


@pytest.mark.parametrize(
    "text,minutes",
    [("90", 90), ("1:30", 2), ("2:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("0:0:30", 1)],
)
def test_slurm_time_formats(text, minutes):
    assert time_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "1h", "0", "1:2:3:4"])
def test_bad_time_is_a_config_error(text):
    with pytest.raises(ConfigError, match="time="):
        time_minutes(text)


def test_arguments_are_routed_by_key():
    args = parse_launch_args(
        ["--config", "c.yaml", "nodes=2", "loss.beta=0.1", "env.A=1", "sweep.optim.lr=[1e-4,3e-4]"],
        prog="p",
        description="",
        task_help=[],
    )
    assert (args.slurm.nodes, args.slurm.env, args.config) == (2, {"A": 1}, "c.yaml")
    assert args.overrides == ["loss.beta=0.1"]
    assert args.grid == {"optim.lr": [1e-4, 3e-4]}


def test_grid_points_are_named_by_their_values():
    points = grid_points({"loss.beta": [0.1, 0.3], "optim.lr": [1e-4]})
    assert [name for name, _ in points] == ["beta0.1_lr0.0001", "beta0.3_lr0.0001"]
    assert points[1][1] == ["loss.beta=0.3", "optim.lr=0.0001"]
    clash = grid_points({"loss.beta": [1], "ref.beta": [2]})
    assert clash[0][0] == "loss_beta1_ref_beta2"


def test_grid_points_have_distinct_run_dirs():
    # f"{v:g}" named both of these beta0.1: two array tasks in one run_dir.
    points = grid_points({"loss.beta": [0.1, 0.1000001], "optim.lr": [1e-7]})
    assert [name for name, _ in points] == ["beta0.1_lr1e-07", "beta0.1000001_lr1e-07"]
    # Values that clean to the same path part keep apart by a hash of the point.
    paths = [name for name, _ in grid_points({"data.path": ["a/b.jsonl", "a-b.jsonl"]})]
    assert len(set(paths)) == 2 and all(p.startswith("patha-b.jsonl_") for p in paths)


@pytest.mark.parametrize("values", [[0.1, 0.3, 0.1], [1, 1.0]])
def test_a_value_listed_twice_is_a_config_error(values):
    with pytest.raises(ConfigError, match=r"sweep.loss.beta=.* is listed twice"):
        grid_points({"loss.beta": values, "optim.lr": [1e-4]})


def test_a_duplicate_grid_point_stops_before_anything_is_submitted(data, tmp_path):
    run_dir = tmp_path / "sweep"
    args = [f"data.path={data}", "loss.algorithm=sft", f"run.run_dir={run_dir}"]
    out = cli("qrpo.slurm.train", *args, "sweep.loss.beta=[0.1,0.1]", *CPU, check=False)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().endswith(
        "is listed twice (positions 0 and 1); each grid point runs once, in its own folder"
    )
    assert "submitted" not in out.stdout and not run_dir.exists()


def _job(**slurm) -> TrainJob:
    cfg = SlurmConfig(**slurm)
    return TrainJob("/r/slurm/train.yaml", "/r", cfg, "/fsdp2.yaml", "/")


def test_one_accelerate_launch_per_node():
    gpu = _job(nodes=4, gpus_per_node=8).launch_command(4, 2, "10.0.0.1", "29999")
    text = " ".join(gpu)
    assert "-m qrpo.slurm.launcher --num_machines 4 --num_processes 32 --machine_rank 2" in text
    assert "--main_process_ip 10.0.0.1 --main_process_port 29999" in text
    assert "--config_file /fsdp2.yaml" in text and "--multi_gpu" not in text
    assert text.endswith("-m qrpo.train --config /r/slurm/train.yaml")
    cpu = " ".join(_job(nodes=2, gpus_per_node=0).launch_command(2, 0, "h", "1"))
    assert "--num_processes 2" in cpu and "--multi_gpu" in cpu and "--config_file" not in cpu
    single = _job(nodes=1, gpus_per_node=0).launch_command(1, 0, "h", "1")
    assert single[1:] == ["-m", "qrpo.train", "--config", "/r/slurm/train.yaml"]  # no launcher


def test_the_command_comes_from_the_job_environment(monkeypatch):
    monkeypatch.setattr("qrpo.slurm.train.node_address", lambda name: f"addr-of-{name}")
    env = types.SimpleNamespace(
        num_nodes=2, node=1, hostnames=["gpu7", "gpu9"], raw_job_id="123456"
    )
    text = " ".join(_job(nodes=2, gpus_per_node=8).command(env))
    assert "--machine_rank 1" in text and "--main_process_ip addr-of-gpu7" in text
    assert f"--main_process_port {rendezvous_port('123456')}" in text


def test_rendezvous_port_is_derived_from_the_job_id():
    assert rendezvous_port("123456") == rendezvous_port("123456") == 23456
    assert rendezvous_port("123456", restarts=1) != rendezvous_port("123456")
    assert 20000 <= rendezvous_port("DEBUG_140234") < 30000


def test_help_lists_slurm_and_training_keys():
    out = cli("qrpo.slurm.train", "--help")
    for key in ("nodes: int = 1", "partition: str", "signal_delay_s", "sweep.KEY", "loss.beta"):
        assert key in out.stdout, key
    assert "num_shards" in cli("qrpo.slurm.generate", "--help").stdout


def test_sweep_dry_run_prints_the_plan_and_submits_nothing(data, tmp_path):
    out = cli(
        "qrpo.slurm.train",
        f"data.path={data}",
        "loss.algorithm=sft",
        f"run.run_dir={tmp_path / 'sweep'}",
        "nodes=2",
        "partition=gpu",
        "sweep.loss.beta=[0.1,0.3]",
        "sweep.optim.lr=[1e-4,3e-4]",
        "--dry-run",
        *CPU,
    )
    text = out.stdout
    assert "plan: 4 run(s) x 2 node(s) x 1 process(es)" in text
    for i, name in enumerate(["beta0.1_lr0.0001", "beta0.1_lr0.0003", "beta0.3_lr0.0001"]):
        assert f"[{i}] {tmp_path / 'sweep' / name}" in text
    assert "#SBATCH --array=0-3%4" in text and "#SBATCH --nodes=2" in text
    assert "#SBATCH --signal=USR2@120" in text and "#SBATCH --partition=gpu" in text
    assert "dry run: nothing submitted" in text
    assert not (tmp_path / "sweep").exists()


def test_local_cluster_is_one_node_and_data_must_exist(data, tmp_path):
    out = cli(
        "qrpo.slurm.train", f"data.path={data}", "cluster=local", "nodes=2", *CPU, check=False
    )
    assert out.returncode == 2 and "cluster=local runs on this machine only" in out.stderr
    out = cli(
        "qrpo.slurm.train", f"data.path={tmp_path / 'no.jsonl'}", "cluster=local", *CPU, check=False
    )
    assert out.returncode == 2 and "no.jsonl: no such file or folder" in out.stderr
    out = cli(
        "qrpo.slurm.train",
        f"data.path={data}",
        "cluster=local",
        *CPU,
        "gpus_per_node=2",
        check=False,
    )
    assert out.returncode == 2 and "gpus_per_node=2 but this machine has" in out.stderr
    out = cli(
        "qrpo.slurm.train", f"data.path={data}", "cluster=local", "timee=5", *CPU, check=False
    )
    assert out.returncode == 2 and "config key 'timee'" in out.stderr
