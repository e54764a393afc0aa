"""The training loop on the tiny model: every algorithm learns, packing is exact, the reference
check, resume after a real kill, two processes against one, and bad data before any model."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from qrpo.common.data import DataError
from qrpo.common.packing import collate, pack
from qrpo.kernels.sequence_model import SequenceLogprobModel, sequence_logps
from qrpo.train.train import TrainingError, load_examples, train
from tests.train.tiny_runs import logged_losses, train_config, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


# Hyper-parameters chosen so that a few steps move each loss clearly on the tiny model.
ALGORITHMS = [
    ("sft", "grouped", ["optim.lr=3e-3"]),
    ("qrpo", "grouped", ["optim.lr=3e-3", "loss.beta=0.3"]),
    ("dpo", "pairs", ["optim.lr=3e-3", "loss.beta=0.1"]),
    ("simpo", "pairs", ["optim.lr=3e-3", "loss.beta=2.0", "loss.gamma=1.0"]),
    ("rebel", "pairs", ["optim.lr=1e-3", "loss.beta=1.0"]),
    ("kto", "grouped", ["optim.lr=3e-3", "loss.beta=0.1"]),
    ("dro", "grouped", ["optim.lr=3e-3", "loss.tau=1.0", "loss.value_lr=0.1"]),
    ("rpo_partition", "grouped", ["optim.lr=3e-3", "loss.tau=1.0"]),
]


@pytest.mark.parametrize("algorithm,data,overrides", ALGORITHMS, ids=[a[0] for a in ALGORITHMS])
def test_every_algorithm_lowers_its_loss(tmp_path, data_files, algorithm, data, overrides):
    # The same global batch every step (max_steps within one epoch would change batches), so
    # the decrease is the optimizer's doing, not a different batch.
    cfg = train_config(tmp_path, data_files[data], algorithm, "run.max_steps=8", *overrides)
    cfg.run.global_batch = 16
    cfg.run.seed = 3
    n_examples = len(load_examples(cfg)[0])
    cfg.data.max_rows = 0
    cfg.run.epochs = 8
    cfg.run.global_batch = n_examples * (2 if data == "pairs" else 1)
    train(cfg)
    losses = logged_losses(Path(cfg.run.run_dir))
    assert len(losses) == 8 and all(map(torch.isfinite, torch.tensor(losses)))
    assert losses[-1] < losses[0] - 0.05 * abs(losses[0]), losses
    final = Path(cfg.run.run_dir) / "final"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(final).config.tie_word_embeddings


def test_packed_logps_equal_each_sequence_alone(tmp_path, data_files):
    from qrpo.common.model import load_model

    cfg = train_config(tmp_path, data_files["grouped"], "qrpo")
    examples, _ = load_examples(cfg)
    model = SequenceLogprobModel(load_model(cfg.model, log=lambda *_: None), "torch").eval()
    packed = sequence_logps(model, examples[:12], token_budget=10_000, device="cpu")
    alone = torch.cat([sequence_logps(model, [e], 10_000, "cpu") for e in examples[:12]])
    assert len(pack(examples[:12], 10_000)) == 1
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)
    # ... and the gradient of the packed sum reaches only the sequences' own tokens.
    batch = collate(examples[:3])
    assert batch.cu_seqlens.tolist()[-1] == batch.total_tokens
    assert (batch.position_ids[0, batch.cu_seqlens[1:-1].long()] == 0).all()


def test_precomputed_and_on_the_fly_reference_agree(tmp_path, data_files):
    from qrpo.common.model import load_model

    cfg = train_config(
        tmp_path / "a",
        data_files["grouped"],
        "qrpo",
        "run.max_steps=3",
        "loss.beta=0.3",
        "optim.lr=1e-3",
        "ref.source=model",
    )
    train(cfg)
    examples, _ = load_examples(cfg)
    model = SequenceLogprobModel(load_model(cfg.model, log=lambda *_: None), "auto").eval()
    ref = sequence_logps(model, examples, 10_000, "cpu").tolist()
    rows = [json.loads(line) for line in Path(data_files["grouped"]).read_text().splitlines()]
    i = 0
    for row in rows:
        for resp in row["responses"]:
            resp["ref_logp"] = ref[i]
            i += 1
    pre = write_jsonl(tmp_path / "with_ref.jsonl", rows)
    cfg2 = train_config(
        tmp_path / "b",
        pre,
        "qrpo",
        "run.max_steps=3",
        "loss.beta=0.3",
        "optim.lr=1e-3",
        "ref.source=data",
    )
    train(cfg2)
    torch.testing.assert_close(
        torch.tensor(logged_losses(tmp_path / "b" / "run")),
        torch.tensor(logged_losses(tmp_path / "a" / "run")),
        rtol=1e-5,
        atol=1e-6,
    )

    # A reference from another checkpoint is caught before training starts.
    for row in rows:
        for resp in row["responses"]:
            resp["ref_logp"] += 0.5
    wrong = write_jsonl(tmp_path / "wrong_ref.jsonl", rows)
    with pytest.raises(TrainingError, match="do not match the starting policy"):
        train(train_config(tmp_path / "c", wrong, "qrpo", "ref.source=data"))


def test_nan_log_probs_of_the_start_fail_the_reference_check(tmp_path, data_files):
    """A starting policy whose log-probs are NaN (a damaged checkpoint) gives a NaN gap: that
    used to pass the check as a "match", since `NaN > tol` is False."""
    from qrpo.common.model import load_model
    from qrpo.train.train import check_precomputed_reference

    cfg = train_config(tmp_path, data_files["grouped"], "qrpo", "ref.source=data")
    examples, _ = load_examples(cfg)
    for e in examples:
        for s in e.sequences:
            s.ref_logp = -5.0
    causal_lm = load_model(cfg.model, log=lambda *_: None)
    with torch.no_grad():
        causal_lm.get_output_embeddings().weight.fill_(float("nan"))
    policy = SequenceLogprobModel(causal_lm, "torch").eval()
    with pytest.raises(TrainingError, match="largest gap nan nats"):
        check_precomputed_reference(policy, examples, cfg, "cpu")


def test_bad_data_stops_before_any_model_is_loaded(tmp_path, monkeypatch):
    import qrpo.train.train as loop

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(loop, "load_model", no_model)
    bad = write_jsonl(
        tmp_path / "bad.jsonl",
        [
            {
                "prompt": "sort 1 2",
                "responses": [
                    {"text": "1 2", "reward": 1.0},
                    {"text": "2 1", "reward": float("nan")},
                ],
            }
        ],
    )
    with pytest.raises(DataError, match=r"row 0, field 'responses\[1\].reward': not finite"):
        train(train_config(tmp_path, bad, "qrpo"))
    pairs_needed = write_jsonl(
        tmp_path / "point.jsonl", [{"prompt": "a", "completion": "b", "reward": 1.0}]
    )
    with pytest.raises(DataError, match="needs chosen/rejected pairs"):
        train(train_config(tmp_path, pairs_needed, "dpo"))


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, data_files):
    cfg = train_config(
        tmp_path,
        data_files["pairs"],
        "dpo",
        "optim.lr=1e12",
        "run.save_every=1",
        "run.max_steps=20",
        "loss.beta=1.0",
    )
    with pytest.raises(TrainingError, match=r"non-finite loss .* at step (\d+)") as info:
        train(cfg)
    from qrpo.train.checkpoint import latest_checkpoint

    step = int(str(info.value).split("at step ")[1].split(":")[0])
    last = latest_checkpoint(cfg.run.run_dir)
    assert last is not None and last.name == f"step_{step:08d}"
    assert str(last) in str(info.value)


def _cli(tmp_path: Path, data: str, *extra: str) -> list[str]:
    return [
        "-m",
        "qrpo.train",
        f"data.path={data}",
        "data.max_length=48",
        "loss.algorithm=qrpo",
        "loss.beta=0.3",
        "optim.lr=1e-3",
        f"run.run_dir={tmp_path}",
        "run.trackers=[]",
        "run.plot=false",
        "run.global_batch=8",
        "run.micro_batch_tokens=256",
        "run.peak_tflops=1.0",
        "optim.scheduler=cosine",
        "optim.warmup_ratio=0.2",
        "loss.estimator=randomized",
        *extra,
    ]


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


STEPS = 24


def _resumable(run_dir: Path, data: str) -> list[str]:
    return [
        sys.executable,
        *_cli(run_dir, data, f"run.max_steps={STEPS}", "run.epochs=3", "run.save_every=3"),
    ]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_files) -> list[float]:
    run_dir = tmp_path_factory.mktemp("full")
    subprocess.run(
        _resumable(run_dir, data_files["grouped"]),
        check=True,
        cwd=ROOT,
        env=_env(),
        capture_output=True,
    )
    losses = logged_losses(run_dir)
    assert len(losses) == STEPS
    return losses


def _wait_for_checkpoint(run_dir: Path, step: int, timeout: float = 120) -> None:
    marker = run_dir / "checkpoints" / "latest"
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.exists() and marker.read_text().strip() >= f"step_{step:08d}":
            return
        time.sleep(0.05)
    raise AssertionError(f"no checkpoint at step {step} within {timeout} s")


def test_killed_run_resumes_to_identical_losses(tmp_path, data_files, uninterrupted):
    args = _resumable(tmp_path, data_files["grouped"])
    proc = subprocess.Popen(
        args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_checkpoint(tmp_path, 6)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= len(logged_losses(tmp_path)) < STEPS, "the run must be killed mid-way"
    subprocess.run(args, check=True, cwd=ROOT, env=_env(), capture_output=True)
    assert logged_losses(tmp_path) == uninterrupted  # bitwise, every step


def test_preemption_signal_saves_exits_75_and_resumes(tmp_path, data_files, uninterrupted):
    args = _resumable(tmp_path, data_files["grouped"])
    proc = subprocess.Popen(
        args, cwd=ROOT, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    _wait_for_checkpoint(tmp_path, 3)
    proc.send_signal(signal.SIGUSR2)
    assert proc.wait(timeout=120) == 75
    done = len(logged_losses(tmp_path))
    assert done < STEPS
    # The checkpoint is at the step where the processes agreed, not at the last save_every.
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == f"step_{done:08d}"
    subprocess.run(args, check=True, cwd=ROOT, env=_env(), capture_output=True)
    assert logged_losses(tmp_path) == uninterrupted


def test_two_processes_match_one(tmp_path, data_files):
    common_args = _cli(tmp_path / "x", data_files["pairs"], "run.max_steps=4")
    common_args = [
        a
        for a in common_args
        if not a.startswith(("run.run_dir", "loss.algorithm", "loss.beta", "loss.estimator"))
    ]
    common_args += ["loss.algorithm=dpo", "loss.beta=0.1", "run.global_batch=16"]
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run(
        [sys.executable, *common_args, f"run.run_dir={one}"],
        check=True,
        cwd=ROOT,
        env=_env(),
        capture_output=True,
    )
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        "29533",
    ]
    out = subprocess.run(
        [*launch, *common_args, f"run.run_dir={two}"],
        cwd=ROOT,
        env=_env(),
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es)" in out.stdout
    torch.testing.assert_close(
        torch.tensor(logged_losses(two)), torch.tensor(logged_losses(one)), rtol=1e-5, atol=1e-6
    )
    from safetensors.torch import load_file

    from qrpo.common.tiny import ensure_tiny

    start = load_file(ensure_tiny() / "model.safetensors")
    a = load_file(one / "final" / "model.safetensors")
    b = load_file(two / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    moved = max((a[k] - start[k]).abs().max().item() for k in a)
    # Adam turns float-reordering noise of near-zero gradients into updates of up to ~lr, so the
    # tolerance is 1e-4 on weights that moved by ~4 steps x lr=1e-3.
    assert moved > 2e-3
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-4)


def test_bf16_autocast_logs_to_tensorboard_and_plots(tmp_path, data_files):
    cfg = train_config(
        tmp_path,
        data_files["grouped"],
        "qrpo",
        "run.max_steps=3",
        "loss.beta=0.3",
        "run.mixed_precision=bf16",
        "run.trackers=[tensorboard]",
        "run.plot=true",
        "run.peak_tflops=0.0",
    )
    train(cfg)
    run_dir = Path(cfg.run.run_dir)
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in (
        "loss",
        "grad_norm",
        "lr",
        "tokens_per_s",
        "mfu",
        "peak_memory_gb",
        "qrpo/q",
        "qrpo/f_q",
        "qrpo/beta_logz",
        "qrpo/target",
        "qrpo/residual",
        "qrpo/log_ratio",
    ):
        assert all(map(lambda r: r[key] == r[key], records)), key  # present and not NaN
    assert 0 < records[-1]["mfu"] < 1
    assert list(run_dir.glob("qrpo/**/events.out.tfevents.*"))
    assert (run_dir / "training_curves.png").stat().st_size > 10_000
    saved = (run_dir / "config.yaml").read_text()
    assert "mixed_precision: bf16" in saved
