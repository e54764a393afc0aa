"""run.resume with a changed config: auto stops on keys that change the trajectory (listing them
old -> new) before any model is loaded, force applies the new values from the next step, never
refuses a used run directory; allowed changes (logging, a schedule length that keeps the steps
done) resume bitwise."""

import json
import math
import random
from pathlib import Path

import pytest
import torch

from qrpo.common.config import ConfigError, build_config
from qrpo.common.tiny import TASK
from qrpo.train.config import TrainConfig
from qrpo.train.resume import HISTORY, apply_new_values
from qrpo.train.train import train


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "sft.jsonl"
    rows = [
        {"prompt": p, "completion": TASK.demonstration(p, rng, noise=0.3)}
        for p in TASK.prompts("train", 8)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(run_dir: Path, data: str, *overrides: str) -> TrainConfig:
    return build_config(
        TrainConfig,
        None,
        [
            f"data.path={data}",
            "data.max_length=48",
            "loss.algorithm=sft",
            f"run.run_dir={run_dir}",
            "run.trackers=[]",
            "run.plot=false",
            "run.global_batch=2",
            "run.epochs=2",
            "run.micro_batch_tokens=256",
            "run.peak_tflops=1.0",
            "optim.lr=3e-4",
            "optim.scheduler=cosine",
            "optim.warmup_ratio=0.1",
            *overrides,
        ],
    )


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _snapshot(run_dir: Path) -> dict:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def no_model(monkeypatch):
    import qrpo.train.train as loop

    def load_model(*args, **kwargs):
        raise AssertionError("a model was loaded although the run had to stop")

    monkeypatch.setattr(loop, "load_model", load_model)


def _cosine(step: int, total: int) -> float:
    return 0.5 * (1 + math.cos(math.pi * step / total))


def test_changed_lr_stops_and_force_applies_it_from_the_next_step(tmp_path, data, monkeypatch):
    run = tmp_path / "run"
    train(_cfg(run, data, "run.max_steps=2"))
    assert [r["step"] for r in _records(run)] == [1, 2]
    before = _snapshot(run)
    changed = ("run.max_steps=4", "optim.lr=1e-3", "optim.warmup_ratio=0")

    # auto: stop before any model is loaded, every key that changes the run named old -> new,
    # and nothing in the run directory touched.
    import qrpo.train.train as loop

    real_load_model = loop.load_model
    monkeypatch.setattr(loop, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    with pytest.raises(ConfigError) as info:
        train(_cfg(run, data, *changed))
    message = str(info.value)
    assert "checkpoint at step 2 made with other values of keys that change" in message
    assert "  optim.lr: 0.0003 -> 0.001\n" in message
    assert "  optim.warmup_ratio: 0.1 -> 0.0\n" in message
    assert "  run.max_steps: 2 -> 4 (the cosine schedule would span 4 steps instead of 2" in message
    assert "run.resume=force" in message
    assert _snapshot(run) == before

    # force: resumes at step 2; steps 3-4 run at the new base lr on the new schedule.
    monkeypatch.setattr(loop, "load_model", real_load_model)
    train(_cfg(run, data, *changed, "run.resume=force"))
    records = _records(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # The logged lr is the scheduler's after the step: base * factor(step).
    for r in records[2:]:
        assert r["lr"] == pytest.approx(1e-3 * _cosine(r["step"], 4), abs=1e-12), r
    assert records[2]["lr"] == pytest.approx(1.4645e-4, rel=1e-4)  # old base: 4.39e-05
    history = (run / HISTORY).read_text()
    assert "resume: force\n  action: resumed at step 2\n  forced:\n" in history
    assert "    optim.lr:\n      old: 0.0003\n      new: 0.001\n" in history
    saved = build_config(TrainConfig, run / "config.yaml")
    assert (saved.optim.lr, saved.run.max_steps) == (1e-3, 4)


def test_force_sets_the_optimizer_values_a_checkpoint_restores():
    from transformers import get_scheduler

    def make(lr, total, warmup, betas):
        params = [torch.nn.Parameter(torch.ones(3))]
        opt = torch.optim.AdamW(params, lr=lr, betas=betas, weight_decay=0.0)
        return opt, get_scheduler("cosine", opt, num_warmup_steps=warmup, num_training_steps=total)

    opt, sched = make(3e-4, 3, 1, (0.9, 0.999))
    for _ in range(2):
        opt.param_groups[0]["params"][0].grad = torch.ones(3)
        opt.step()
        sched.step()
    state = (opt.state_dict(), sched.state_dict())
    cfg = build_config(
        TrainConfig, None, ["optim.lr=1e-3", "optim.betas=[0.8,0.99]", "optim.weight_decay=0.1"]
    )
    opt2, sched2 = make(cfg.optim.lr, 6, 0, tuple(cfg.optim.betas))
    opt2.load_state_dict(state[0])
    sched2.load_state_dict(state[1])
    assert opt2.param_groups[0]["lr"] != pytest.approx(1e-3 * _cosine(2, 6))  # the bug: old base
    logged = []
    apply_new_values(cfg, opt2, sched2, logged.append)
    group = opt2.param_groups[0]
    assert group["lr"] == pytest.approx(1e-3 * _cosine(2, 6))
    assert (group["betas"], group["weight_decay"]) == ((0.8, 0.99), 0.1)
    assert sched2.base_lrs == [1e-3] and sched2.get_last_lr() == [group["lr"]]
    sched2.step()
    assert opt2.param_groups[0]["lr"] == pytest.approx(1e-3 * _cosine(3, 6))
    assert "new optimizer values" in logged[0]


def test_allowed_changes_resume_bitwise(tmp_path, data):
    """A constant schedule lengthened by max_steps, and logging/cadence keys: the resumed run is
    the uninterrupted one, bitwise."""
    constant = ("optim.scheduler=constant", "optim.warmup_ratio=0.0")
    full = tmp_path / "full"
    train(_cfg(full, data, *constant, "run.max_steps=3"))
    run = tmp_path / "run"
    train(_cfg(run, data, *constant, "run.max_steps=1"))
    train(
        _cfg(run, data, *constant, "run.max_steps=3", "run.save_every=2", "run.keep_checkpoints=3")
    )
    assert [r["loss"] for r in _records(run)] == [r["loss"] for r in _records(full)]
    history = (run / HISTORY).read_text()
    assert "action: resumed at step 1\n  forced: {}\n  changed:\n    run.max_steps:" in history


def test_schedule_length_changes_are_judged_by_the_steps_done(tmp_path, data):
    run = tmp_path / "run"
    # 16 examples / 4 per step: 4 steps an epoch. A cap past the end of the data does not bind.
    from qrpo.train.resume import plan_resume

    base = _cfg(run, data, "run.epochs=1", "run.max_steps=3")
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "trainer.json").write_text(
        json.dumps({"step": 2, "examples": 16})
    )
    (run / "checkpoints" / "latest").write_text("step_00000002")
    from qrpo.common.config import save_config
    from qrpo.train.checkpoint import write_manifest

    write_manifest(run / "checkpoints" / "step_00000002")

    save_config(base, run)
    # cosine over 3 steps vs 4 steps: the two steps done had other learning rates.
    with pytest.raises(ConfigError, match=r"run.max_steps: 3 -> 0 \(the cosine schedule"):
        plan_resume(_cfg(run, data, "run.epochs=1", "run.max_steps=0"), {"examples": 16}, 4)
    # The cap binds in neither (4 steps both): the same schedule.
    save_config(_cfg(run, data, "run.epochs=1", "run.max_steps=10"), run)
    plan = plan_resume(_cfg(run, data, "run.epochs=1", "run.max_steps=0"), {"examples": 16}, 4)
    assert plan.step == 2 and not plan.trajectory and "run.max_steps" in plan.changes
    # The data changed under the same config: the checkpoint (saved before fingerprints) has
    # only its example count to compare.
    with pytest.raises(ConfigError, match=r"training data changed since the checkpoint: 16 -> 12"):
        plan_resume(_cfg(run, data, "run.epochs=1", "run.max_steps=10"), {"examples": 12}, 4)


def test_never_refuses_a_used_run_directory(tmp_path, data, no_model):
    run = tmp_path / "run"
    (run / "slurm").mkdir(parents=True)  # the launcher's own folder alone is still fresh
    (run / "slurm" / "train.yaml").write_text("{}")
    from qrpo.train.resume import plan_resume

    assert plan_resume(_cfg(run, data, "run.resume=never"), {"examples": 16}, 4).checkpoint is None
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(ConfigError, match=r"run.resume=never: run directory .* is not empty"):
        train(_cfg(run, data, "run.resume=never"))


def test_the_cli_stops_with_one_message_and_no_traceback(tmp_path, data, capsys, no_model):
    from qrpo.train.__main__ import main

    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit) as info:
        main(
            [f"data.path={data}", "loss.algorithm=sft", "run.global_batch=2"]
            + [f"run.run_dir={run}", "run.resume=never"]
        )
    assert info.value.code == 2
    err = capsys.readouterr().err
    last = err.rstrip().split("\n")[-1]  # (datasets may draw a progress bar before it)
    assert last.startswith("error: run.resume=never:") and "Traceback" not in err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]


def test_the_slurm_launcher_checks_never_before_it_submits(tmp_path, data, capsys):
    from qrpo.slurm.train import main

    run = tmp_path / "run"
    args = [f"data.path={data}", "loss.algorithm=sft", "run.global_batch=2", f"run.run_dir={run}"]
    args += ["run.resume=never", "cluster=local", "gpus_per_node=0", "--dry-run"]
    main(args)  # an empty (absent) run directory: planned, and the job itself resumes its own
    assert "resume: auto" in capsys.readouterr().out  # checkpoints when it is requeued
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    with pytest.raises(SystemExit) as info:
        main(args)
    assert info.value.code == 2
    assert "run.resume=never: run directory" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
