"""The steps one by one: seeded sampling whatever the batching, prompt ids as qrpo.common.data gives
them, rewards (NaN stops naming the row; a tiny local reward model), the build regimes, shard
resolution from SLURM, and the command lines."""

import json
import math
from pathlib import Path

import pytest
import torch

from qrpo.common.config import build_config
from qrpo.common.data import DataConfig, DataError, load_canonical
from qrpo.common.model import ModelConfig, load_model, load_tokenizer
from qrpo.common.rewards import REWARDS, register_reward
from qrpo.common.sampling import generate_samples, sample_completions
from qrpo.common.tiny import TASK
from qrpo.generate.build import build_rows
from qrpo.generate.config import PipelineConfig
from qrpo.generate.pipeline import run_pipeline, run_step
from qrpo.generate.records import read_data_groups
from qrpo.generate.shards import ShardError, read_rows_parquet, resolve_shard

QUIET = lambda *_: None  # noqa: E731


def _write(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _cfg(out: Path, data: str, *overrides: str) -> PipelineConfig:
    return build_config(
        PipelineConfig,
        None,
        [f"data.path={data}", f"out={out}", "shard=0", "num_shards=1", *overrides],
    )


@pytest.fixture(scope="module")
def tiny():
    cfg = ModelConfig(name_or_path="tiny")
    return load_model(cfg, log=QUIET), load_tokenizer(cfg)


# --------------------------------------------------------------------------- sample


def test_samples_are_seeded_per_prompt_whatever_the_batching(tiny):
    model, tok = tiny
    prompts = TASK.prompts("train", 5)
    kw = dict(n=3, max_new_tokens=8, seed=3, temperature=0.9, top_p=0.8)
    big = sample_completions(model, tok, prompts, batch_size=64, **kw)
    small = sample_completions(model, tok, prompts, batch_size=2, **kw)
    alone = sample_completions(model, tok, prompts[3:4], batch_size=1, **kw)
    assert big == small and alone == big[3:4]
    assert len({t for ts in big for t in ts}) > 10  # different streams, different samples
    assert sample_completions(model, tok, prompts[:1], batch_size=1, **{**kw, "seed": 4}) != big[:1]
    # Greedy: no sampling, and every sample of a prompt the same.
    greedy, tokens = generate_samples(
        model, tok, [tok("sort 1 2")["input_ids"]], ["a"], n=2, temperature=0, max_new_tokens=4
    )
    assert greedy[0][0] == greedy[0][1] and 2 <= tokens <= 8


def test_prompt_ids_are_common_datas_whatever_the_format(tmp_path):
    chat = [{"role": "user", "content": "sort 3 1"}]
    only = _write(
        tmp_path / "p.jsonl", [{"prompt": chat}, {"prompt": "sort 2 1", "prompt_id": "x"}]
    )
    pairs = _write(tmp_path / "pairs.jsonl", [{"prompt": chat, "chosen": "1 3", "rejected": "3"}])
    groups, _ = read_data_groups(DataConfig(path=only))
    assert [g["prompt_id"] for g in groups] == [
        load_canonical(DataConfig(path=pairs))[0]["prompt_id"],
        "x",
    ]
    assert groups[1]["prompt"] == "sort 2 1" and groups[0]["messages"] == chat
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": chat}, {"prompt": ""}])
    with pytest.raises(DataError, match=r"bad.jsonl, row 1, field 'prompt': empty prompt"):
        read_data_groups(DataConfig(path=bad))


# --------------------------------------------------------------------------- reward


def _grouped(tmp_path: Path, texts=("1 2", "2 1 3", "0 0")) -> str:
    return _write(
        tmp_path / "grouped.jsonl",
        [{"prompt": p, "responses": [{"text": t} for t in texts]} for p in TASK.prompts("eval", 3)],
    )


def test_nan_or_missing_reward_stops_naming_the_row(tmp_path):
    data = _grouped(tmp_path)

    @register_reward("nan_on_row_1")
    def nan_on_row_1(rows, completions, cfg):
        bad = TASK.prompts("eval", 3)[1]
        return [
            [math.nan if r["prompt"] == bad and c == "2 1 3" else 1.0 for c in cs]
            for r, cs in zip(rows, completions)
        ]

    @register_reward("none_on_row_2")
    def none_on_row_2(rows, completions, cfg):
        bad = TASK.prompts("eval", 3)[2]
        return [
            [None if r["prompt"] == bad else 1.0 for _ in cs] for r, cs in zip(rows, completions)
        ]

    try:
        cfg = _cfg(tmp_path / "a", data, "steps=[reward]", "reward.fn=nan_on_row_1")
        with pytest.raises(
            DataError, match=r"row 1, field 'completions\[1\].reward'.*non-finite value nan"
        ):
            run_step(cfg, "reward", QUIET)
        assert not list((tmp_path / "a").rglob("chunk-*.parquet"))
        cfg = _cfg(tmp_path / "b", data, "steps=[reward]", "reward.fn=none_on_row_2")
        with pytest.raises(DataError, match=r"row 2, field 'completions\[0\].reward'.*gave none"):
            run_step(cfg, "reward", QUIET)
    finally:
        del REWARDS["nan_on_row_1"], REWARDS["none_on_row_2"]


def test_reward_functions_see_the_rows_other_columns(tmp_path):
    # What code rewards need: the problem's tests travel as `info`; one call per chunk.
    data = _write(
        tmp_path / "problems.jsonl",
        [
            {
                "prompt": "sort 2 1",
                "answer": "1 2",
                "responses": [{"text": "1 2"}, {"text": "2 1"}],
            },
            {"prompt": "sort 3 1", "answer": "1 3", "responses": [{"text": "3"}, {"text": "1 3"}]},
        ],
    )
    calls = []

    @register_reward("exact_answer")
    def exact_answer(rows, completions, cfg):
        calls.append(sum(len(cs) for cs in completions))
        return [[float(c == r["answer"]) for c in cs] for r, cs in zip(rows, completions)]

    try:
        cfg = _cfg(tmp_path, data, "steps=[reward,build,merge]", "reward.fn=exact_answer")
        run_pipeline(cfg, QUIET)
    finally:
        del REWARDS["exact_answer"]
    rows = read_rows_parquet(tmp_path / "build.parquet")
    assert calls == [4] and [r["ref_rewards"] for r in rows] == [[1.0, 0.0], [0.0, 1.0]]
    assert json.loads(rows[1]["info"]) == {"answer": "1 3"}


def test_reward_model_scores_with_its_own_template_and_truncation(tmp_path):
    from transformers import AutoTokenizer, LlamaForSequenceClassification

    from qrpo.common.tiny import ensure_tiny, model_config

    tok = AutoTokenizer.from_pretrained(ensure_tiny())
    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(
        model_config(len(tok), num_labels=1, pad_token_id=tok.pad_token_id)
    ).eval()
    rm.save_pretrained(tmp_path / "rm")
    tok.save_pretrained(tmp_path / "rm")
    data = _grouped(tmp_path, texts=("1 2", "2 1 3 3 3 3 3 3 3", "0"))
    for name, max_length in (("full", 2048), ("cut", 12)):
        cfg = _cfg(
            tmp_path / name,
            data,
            "steps=[reward]",
            "reward.fn=model",
            f"reward.model={tmp_path / 'rm'}",
            "reward.batch_size=2",
            f"reward.max_length={max_length}",
        )
        run_step(cfg, "reward", QUIET)
        rows = read_rows_parquet(next((tmp_path / name).rglob("chunk-000000.parquet")))
        got = [c["reward"] for r in rows for c in r["completions"]]
        assert rows[0]["ref_rewards"] == got[:3] and len(set(got)) > 3
        expected = []
        for r in rows:
            for c in r["completions"]:
                text = tok.apply_chat_template(
                    [*r["messages"], {"role": "assistant", "content": c["text"]}], tokenize=False
                )
                ids = tok(text, add_special_tokens=False)["input_ids"][:max_length]
                with torch.no_grad():
                    expected.append(rm(torch.tensor([ids])).logits[0, 0].item())
        torch.testing.assert_close(torch.tensor(got), torch.tensor(expected), rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- build


def _group(rewards: list[float], given: int = 0, pairs=()) -> dict:
    comps = [
        {
            "completion_id": f"g{j}",
            "text": f"given {j}",
            "reward": 0.5,
            "ref_logp": None,
            "ref_index": -1,
        }
        for j in range(given)
    ]
    comps += [
        {
            "completion_id": f"s{k}",
            "text": f"sample {k}",
            "reward": r,
            "ref_logp": -1.0,
            "ref_index": k,
        }
        for k, r in enumerate(rewards)
    ]
    return {
        "prompt_id": "p",
        "prompt": "sort 1",
        "messages": [],
        "completions": comps,
        "ref_rewards": list(rewards),
        "chosen": -1,
        "rejected": -1,
        "source_row": 4,
        "pairs": [list(p) for p in pairs],
    }


def test_build_regimes():
    g = _group([0.2, 0.9, 0.1, 0.9, 0.5, 0.3])
    (row,) = build_rows(g, "pointwise", "src")
    assert [c["ref_index"] for c in row["completions"]] == [0, 1, 2, 3, 4, 5]
    assert (row["chosen"], row["ref_rewards"]) == (-1, g["ref_rewards"])
    (row,) = build_rows(g, "best_worst", "src")
    assert [c["completion_id"] for c in row["completions"]] == ["s1", "s2"]
    assert (row["chosen"], row["rejected"], row["completions"][0]["ref_logp"]) == (0, 1, -1.0)
    rows = build_rows(g, "random_pairs", "src", pairs=3, seed=1)
    ids = [c["completion_id"] for r in rows for c in r["completions"]]
    assert len(ids) == len(set(ids)) and 1 <= len(rows) <= 3
    assert all(r["completions"][0]["reward"] > r["completions"][1]["reward"] for r in rows)
    assert rows == build_rows(g, "random_pairs", "src", pairs=3, seed=1)  # seeded per prompt
    assert build_rows(_group([0.4, 0.4, 0.4]), "best_worst", "src") == []  # all tied: dropped

    # offline: the data's own pairs, a completion reused by two pairs gets a second id
    g = _group([0.1, 0.2], given=3, pairs=[(0, 1), (0, 2)])
    rows = build_rows(g, "offline", "src")
    assert [[c["completion_id"] for c in r["completions"]] for r in rows] == [
        ["g0", "g1"],
        ["g0~1", "g2"],
    ]
    assert all(c["ref_index"] == -1 for r in rows for c in r["completions"])
    (row,) = build_rows(_group([0.1, 0.2], given=2), "offline", "src")  # no pairs: pointwise
    assert [c["completion_id"] for c in row["completions"]] == ["g0", "g1"]

    g = _group([0.1, None])
    with pytest.raises(DataError, match=r"src, row 4, field 'completions\[1\].reward': missing"):
        build_rows(g, "pointwise", "src")
    with pytest.raises(DataError, match="no reference rewards"):
        build_rows({**g, "ref_rewards": []}, "pointwise", "src")


# --------------------------------------------------------------------------- shards, commands


def test_shard_from_slurm_unless_given():
    env = {"SLURM_ARRAY_TASK_ID": "7", "SLURM_ARRAY_TASK_MIN": "4", "SLURM_ARRAY_TASK_COUNT": "5"}
    assert resolve_shard(-1, 0, env) == (3, 5)
    assert resolve_shard(1, 2, env) == (1, 2)
    assert resolve_shard(-1, 0, {}) == (0, 1)
    with pytest.raises(ShardError, match="not in"):
        resolve_shard(-1, 2, {"SLURM_ARRAY_TASK_ID": "2"})


def test_a_rerun_with_other_settings_or_without_input_is_refused(tmp_path):
    data = _grouped(tmp_path)
    run_step(_cfg(tmp_path, data, "steps=[reward]", "chunk_size=1"), "reward", QUIET)
    # A finished shard is left alone; an unfinished one started with another config is refused.
    (tmp_path / "reward" / "shard-00000-of-00001" / "manifest.json").unlink()
    (tmp_path / "reward" / "shard-00000-of-00001" / "chunk-000002.parquet").unlink()
    with pytest.raises(ShardError, match="started with another config"):
        run_step(
            _cfg(tmp_path, data, "steps=[reward]", "chunk_size=1", "reward.keep_existing=true"),
            "reward",
            QUIET,
        )
    run_step(_cfg(tmp_path, data, "steps=[reward]", "chunk_size=1"), "reward", QUIET)
    assert (tmp_path / "reward" / "shard-00000-of-00001" / "manifest.json").is_file()
    # A step whose step before has not run says so.
    with pytest.raises(ShardError, match="has no shards: run step sample first"):
        run_step(_cfg(tmp_path / "x", data, "steps=[sample,reward]"), "reward", QUIET)


@pytest.mark.parametrize(
    "module", ["__main__", "pipeline", "sample", "reward", "build", "ref_logps", "merge"]
)
def test_help_lists_the_keys(module, capsys):
    import importlib

    main = importlib.import_module(f"qrpo.generate.{module}").main
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    text = capsys.readouterr().out
    assert "configuration keys" in text
    assert ("n_train" in text) if module == "__main__" else ("sample.max_new_tokens" in text)


def test_task_files(tmp_path):
    from qrpo.generate.__main__ import main

    main(["step=task", f"out={tmp_path}", "n_sft=4", "n_train=5", "n_eval=2"])
    assert len((tmp_path / "train_prompts.jsonl").read_text().splitlines()) == 5
    assert len((tmp_path / "eval_prompts.jsonl").read_text().splitlines()) == 2
    assert len((tmp_path / "sft.jsonl").read_text().splitlines()) == 4


def test_pipeline_with_reward_of_the_task_runs_end_to_end(tmp_path):
    prompts = _write(tmp_path / "p.jsonl", [{"prompt": p} for p in TASK.prompts("train", 3)])
    cfg = _cfg(tmp_path, prompts, "sample.n=2", "sample.max_new_tokens=6", "build.regime=pointwise")
    results = run_pipeline(cfg, QUIET)
    assert results["merge"] == tmp_path / "ref_logps.parquet"
    assert results["sample"]["summary"]["completions"] == 6
    again = run_pipeline(cfg, QUIET)  # idempotent: nothing recomputed, the same file
    assert again["ref_logps"]["seconds"] == results["ref_logps"]["seconds"]
