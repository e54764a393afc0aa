"""One reward registry for generate and evaluate: a reward registered through the public path
scores generate's reference samples and evaluate's held-out samples alike; the code reward
serves the reward step too; the renamed key `reward.kind` names its new key."""

import json
import re
from pathlib import Path

import pytest

from qrpo.common.config import ConfigError, build_config
from qrpo.common.rewards import REWARDS, RewardConfig, register_reward
from qrpo.common.tiny import TASK
from qrpo.evaluate.evaluate import EvalConfig, evaluate
from qrpo.generate.config import PipelineConfig
from qrpo.generate.pipeline import run_step
from qrpo.generate.shards import read_rows_parquet

QUIET = lambda *_: None  # noqa: E731


def _words(text: str) -> float:
    return float(len(text.split()))


@pytest.fixture
def words_reward():
    """A toy reward: the completion's length in words, registered as `reward.fn=words`."""
    calls = []

    @register_reward("words")
    def words(rows, completions, cfg):
        calls.append([r["prompt"] for r in rows])
        return [[_words(c) for c in cs] for cs in completions]

    yield calls
    del REWARDS["words"]


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _pipeline(tmp_path: Path, data: str, *overrides: str) -> PipelineConfig:
    return build_config(
        PipelineConfig,
        None,
        [f"data.path={data}", f"out={tmp_path}", "shard=0", "num_shards=1", *overrides],
    )


def test_a_registered_reward_scores_generate_and_evaluate_alike(tmp_path, words_reward):
    texts = ["1 2", "2 1 3", "x", "0 0 0 0"]
    prompts = TASK.prompts("eval", 3)
    data = _write(
        tmp_path / "grouped.jsonl",
        [{"prompt": p, "responses": [{"text": t} for t in texts]} for p in prompts],
    )
    cfg = _pipeline(tmp_path / "gen", data, "steps=[reward]", "reward.fn=words")
    run_step(cfg, "reward", QUIET)
    rows = read_rows_parquet(next((tmp_path / "gen").rglob("chunk-000000.parquet")))
    assert [r["ref_rewards"] for r in rows] == [[2.0, 3.0, 1.0, 4.0]] * 3
    assert [c["reward"] for r in rows for c in r["completions"]] == [_words(t) for t in texts] * 3
    assert words_reward == [prompts]  # one call for the chunk, with the chat prompts as given

    out = tmp_path / "eval" / "eval.json"
    res = evaluate(
        EvalConfig(
            models=["tiny"],
            reward=RewardConfig(fn="words"),
            n_prompts=3,
            n=2,
            max_new_tokens=8,
            kl=False,
            plots=False,
            out=str(out),
        )
    )
    samples = [json.loads(x) for x in Path(res["files"]["samples"]).read_text().splitlines()]
    assert len(samples) == 6 and len({s["completion"] for s in samples}) > 1
    assert [s["reward"] for s in samples] == [_words(s["completion"]) for s in samples]
    assert res["models"]["tiny"]["mean_reward"] == pytest.approx(
        sum(_words(s["completion"]) for s in samples) / 6
    )
    assert "reward: words" in Path(res["files"]["markdown"]).read_text()


def test_the_code_reward_scores_generates_reference_samples(tmp_path):
    problem = {
        "prompt": "def add(a, b):\n",
        "test": "def check(candidate):\n    assert candidate(1, 2) == 3\n"
        "    assert candidate(2, 2) == 4\n    assert candidate(0, 0) == 1\n",
        "entry_point": "add",
        "responses": [{"text": "    return a + b\n"}, {"text": "    return 3\n"}],
    }
    data = _write(tmp_path / "problems.jsonl", [problem])
    cfg = _pipeline(
        tmp_path / "gen",
        data,
        "steps=[reward]",
        "reward.fn=code",
        "reward.sandbox.wall_seconds=5",
        "reward.sandbox.workers=2",
    )
    run_step(cfg, "reward", QUIET)
    (row,) = read_rows_parquet(next((tmp_path / "gen").rglob("chunk-000000.parquet")))
    # a + b passes 2 of the 3 asserts (the third is wrong on purpose), `return 3` passes 1.
    assert row["ref_rewards"] == [2 / 3, 1 / 3]


def test_unknown_and_renamed_reward_keys_name_what_to_write():
    with pytest.raises(ConfigError, match=r"'reward.kind' is now 'reward.fn'"):
        build_config(EvalConfig, None, ["models=[tiny]", "reward.kind=model"])
    with pytest.raises(ConfigError, match=r"'reward.fn': 'wordz' is not one of .*code, model"):
        RewardConfig(fn="wordz")
    with pytest.raises(ConfigError, match="cannot import no_such_module"):
        evaluate(EvalConfig(models=["tiny"], reward=RewardConfig(fn="no_such_module:words")))


@pytest.fixture
def broken_rewards():
    """Two user rewards that fail before any sampling should: a wrong signature, and a body
    that reads a column the rows do not have."""

    @register_reward("two_args")
    def two_args(rows, completions):
        return [[0.0 for _ in cs] for cs in completions]

    @register_reward("needs_column")
    def needs_column(rows, completions, cfg):
        return [[float(r["answer"]) for _ in cs] for r, cs in zip(rows, completions)]

    yield
    del REWARDS["two_args"], REWARDS["needs_column"]


@pytest.mark.parametrize(
    "fn,words",
    [("two_args", "a reward takes (rows, completions, cfg)"), ("needs_column", "KeyError")],
)
def test_evaluate_checks_the_reward_before_sampling(
    tmp_path, monkeypatch, broken_rewards, fn, words
):
    import qrpo.evaluate.evaluate as ev

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled before the reward was checked")

    monkeypatch.setattr(ev, "sample_completions", no_sampling)
    cfg = EvalConfig(
        models=["tiny"], reward=RewardConfig(fn=fn), n_prompts=2, out=str(tmp_path / "e.json")
    )
    with pytest.raises(ConfigError, match=f"reward.fn={fn}: .*{re.escape(words)}"):
        evaluate(cfg)


def test_generate_checks_the_reward_signature_before_sampling(tmp_path, broken_rewards):
    from qrpo.generate.pipeline import run_pipeline

    data = _write(tmp_path / "prompts.jsonl", [{"prompt": p} for p in TASK.prompts("eval", 2)])
    cfg = _pipeline(tmp_path / "gen", data, "steps=[sample,reward]", "reward.fn=two_args")
    with pytest.raises(ConfigError, match=r"reward.fn=two_args: a reward takes"):
        run_pipeline(cfg, QUIET)
    assert not (tmp_path / "gen" / "sample").exists()
