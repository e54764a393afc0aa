"""Algorithms as specs (qrpo/train/losses/spec.py): the registry is what the config accepts, a loss
registered through the public path trains, and the loop honours each spec's extras (KTO's
mismatched pairs, QRPO's transforms and partition forms)."""

import json
import math
from pathlib import Path

import pytest
import torch

from qrpo.common.config import ConfigError, build_config
from qrpo.common.model import load_model
from qrpo.kernels.sequence_model import SequenceLogprobModel, sequence_logps
from qrpo.train.config import TrainConfig
from qrpo.train.examples import global_batch_indices
from qrpo.train.losses import (
    Algorithm,
    LossInputs,
    algorithm_names,
    get_algorithm,
    register_algorithm,
    unregister_algorithm,
)
from qrpo.train.train import load_examples, train
from tests.train.tiny_runs import train_config

BUILT_IN = {"sft", "qrpo", "dpo", "simpo", "rebel", "kto", "dro", "rpo_partition"}


def test_registry_names():
    assert set(algorithm_names()) == BUILT_IN


def test_specs_say_what_the_loop_needs():
    pairs = {n for n in algorithm_names() if get_algorithm(n).pairs}
    reference_free = {n for n in algorithm_names() if not get_algorithm(n).needs_reference}
    assert pairs == {"dpo", "simpo", "rebel"} and reference_free == {"sft", "simpo"}
    assert get_algorithm("dpo").sequences_per_example == 2
    assert get_algorithm("qrpo").sequences_per_example == 1
    with pytest.raises(ValueError, match="already registered"):
        register_algorithm(Algorithm("dpo", lambda inputs, cfg: None))


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_every_spec_builds_and_prepares_its_examples(tmp_path, data_files, name):
    spec = get_algorithm(name)
    data = data_files["pairs" if spec.pairs else "grouped"]
    examples, _ = load_examples(train_config(tmp_path, data, name))
    assert examples and all(len(e.sequences) == spec.sequences_per_example for e in examples)
    rewards = torch.tensor([s.reward for e in examples for s in e.sequences], dtype=torch.float64)
    if name in ("dro", "rpo_partition"):  # z-scored over the training set
        assert abs(rewards.mean().item()) < 1e-9
        assert rewards.std(correction=0).item() == pytest.approx(1.0)
    elif spec.needs_rewards:
        assert rewards.min() >= 0 and rewards.max() <= 1  # the tiny task's raw graded rewards


# --- a loss added from outside the package -------------------------------------------------------


def reward_weighted_nll(inputs: LossInputs, cfg) -> tuple[torch.Tensor, dict]:
    """Reward-weighted SFT: each completion's NLL scaled by its reward."""
    loss = -inputs.batch.rewards * inputs.logps.float()
    return loss, {"toy/weighted_nll": loss.detach()}


@pytest.fixture
def toy_algorithm():
    spec = register_algorithm(
        Algorithm("reward_weighted_sft", reward_weighted_nll, needs_rewards=True,
                  needs_reference=False)
    )  # fmt: skip
    yield spec
    unregister_algorithm(spec.name)


def test_unknown_algorithm_is_a_config_error():
    with pytest.raises(ConfigError, match="'loss.algorithm': 'reward_weighted_sft' is not one of"):
        build_config(TrainConfig, None, ["loss.algorithm=reward_weighted_sft"])


def test_a_registered_loss_trains_and_logs_its_formula(tmp_path, data_files, toy_algorithm):
    cfg = train_config(
        tmp_path, data_files["grouped"], "reward_weighted_sft", "run.max_steps=3", "optim.lr=1e-3"
    )
    examples, _ = load_examples(cfg)
    assert len(examples) == 96  # pointwise by default: every completion is an example
    train(cfg)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["step"] for r in records] == [1, 2, 3]

    # Step 1's loss is computed before any update: the formula on the starting model's log-probs
    # of the first global batch, averaged over its examples.
    batch = [examples[i] for i in global_batch_indices(len(examples), 16, 0, cfg.run.seed)]
    start = SequenceLogprobModel(load_model(cfg.model, log=lambda *_: None), "torch").eval()
    logps = sequence_logps(start, batch, 10_000, "cpu").double()
    rewards = torch.tensor([e.sequences[0].reward for e in batch], dtype=torch.float64)
    want = (-rewards * logps).mean().item()
    assert records[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert records[0]["toy/weighted_nll"] == pytest.approx(want, rel=1e-5)
    assert records[-1]["loss"] != records[0]["loss"]  # the optimizer moved the policy


# --- each spec's extras, through the loop --------------------------------------------------------


def test_kto_reference_point_uses_mismatched_pairs(tmp_path, data_files):
    from qrpo.train.examples import mismatched

    cfg = train_config(tmp_path, data_files["grouped"], "kto")
    examples, _ = load_examples(cfg)
    shifted = mismatched(examples[:3])
    for i, ex in enumerate(shifted):
        (s,) = ex.sequences
        own, nxt = examples[i].sequences[0], examples[(i + 1) % 3].sequences[0]
        assert s.input_ids[: s.prompt_len] == own.input_ids[: own.prompt_len]
        assert s.input_ids[s.prompt_len :] == nxt.input_ids[nxt.prompt_len :]
    cfg = train_config(
        tmp_path, data_files["grouped"], "kto", "run.max_steps=2", "ref.source=model"
    )
    train(cfg)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["kto/kl"] >= 0 for r in records)


@pytest.mark.parametrize(
    "transform", ["log", "normal_icdf", "scaled_normal_icdf", "square", "sqrt"]
)
def test_qrpo_transforms_train(tmp_path, data_files, transform):
    cfg = train_config(
        tmp_path,
        data_files["grouped"],
        "qrpo",
        "run.max_steps=2",
        "loss.beta=0.3",
        f"loss.transform={transform}",
        "loss.estimator=midrank",
        "loss.length_normalized=true",
        "loss.max_beta=0.5",
    )
    train(cfg)
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert all(r["loss"] == r["loss"] and r["qrpo/beta"] <= 0.5 for r in records)


def test_qrpo_partition_override_reaches_the_loss(tmp_path, data_files):
    """loss.partition=finite_k from the command line: every row of the grouped data is one of
    its prompt's 4 reference completions, left out of its own set (K = 3), so the logged
    beta*log Z is beta * log(1/4 sum_j exp(j/3/beta)); empirical trains too."""
    beta = 0.3
    want = beta * math.log(sum(math.exp(j / 3 / beta) for j in range(4)) / 4)
    for partition in ("finite_k", "empirical"):
        run_dir = tmp_path / partition
        cfg = train_config(
            run_dir, data_files["grouped"], "qrpo", "run.max_steps=1", f"loss.beta={beta}",
            f"loss.partition={partition}",
        )  # fmt: skip
        train(cfg)
        lines = (Path(cfg.run.run_dir) / "metrics.jsonl").read_text().splitlines()
        record = json.loads(lines[0])
        assert record["loss"] == record["loss"]
        if partition == "finite_k":
            assert record["qrpo/beta_logz"] == pytest.approx(want, rel=1e-6)
