"""Data formats -> canonical schema, and one clear error per malformed file."""

import json
from pathlib import Path

import pytest

from common.data import DataConfig, DataError, load_canonical
from common.model import ModelConfig, load_tokenizer
from common.tokenize import shifted_targets, tokenize_rows

MALFORMED = Path(__file__).parent / "assets" / "malformed"

# file, require_rewards, min_ref_rewards, row, field, words in the message
CASES = [
    ("missing_reward.jsonl", True, 0, 1, "reward", "missing reward"),
    ("nan_reward.jsonl", True, 0, 1, "reward", "not finite"),
    ("inf_reward.jsonl", False, 0, 1, "reward", "not finite"),
    ("string_reward.jsonl", False, 0, 1, "reward", "not a number"),
    ("empty_prompt.jsonl", False, 0, 1, "prompt", "empty prompt"),
    ("empty_completion.jsonl", False, 0, 1, "completion", "empty completion"),
    ("few_ref_rewards.jsonl", True, 3, 1, "ref_rewards", "need at least 3"),
    ("duplicate_ids.jsonl", False, 0, 2, "completion_id", "first seen in row 0"),
    ("wrong_type_prompt.jsonl", False, 0, 1, "prompt", "expected text"),
    ("grouped_missing_reward.jsonl", True, 0, 0, "responses[1].reward", "missing reward"),
    ("grouped_not_list.jsonl", False, 0, 0, "responses", "non-empty list"),
    ("pairs_missing_rejected.jsonl", False, 0, 1, "rejected", "missing"),
    ("pairs_identical.jsonl", False, 0, 0, "rejected", "identical"),
    ("broken_json.jsonl", False, 0, 1, None, "invalid JSON on line 2"),
    ("unknown_format.jsonl", False, 0, None, None, "cannot tell the format"),
]


@pytest.mark.parametrize("name,rewards,min_refs,row,field,words", CASES, ids=[c[0] for c in CASES])
def test_malformed_file_names_file_row_and_field(name, rewards, min_refs, row, field, words):
    cfg = DataConfig(path=str(MALFORMED / name), min_ref_rewards=min_refs)
    with pytest.raises(DataError) as info:
        load_canonical(cfg, require_rewards=rewards)
    err = info.value
    assert err.source.endswith(name)
    assert (err.row, err.field) == (row, field), str(err)
    assert words in str(err)
    assert name in str(err)


def test_each_malformed_file_has_its_own_message():
    messages = set()
    for name, rewards, min_refs, *_ in CASES:
        with pytest.raises(DataError) as info:
            load_canonical(
                DataConfig(path=str(MALFORMED / name), min_ref_rewards=min_refs),
                require_rewards=rewards,
            )
        messages.add(str(info.value))
    assert len(messages) == len(CASES)
    assert len(list(MALFORMED.iterdir())) == len(CASES) + 1  # + too_long, tested below


def test_too_long_errors_or_drops(tiny_tokenizer):
    cfg = DataConfig(path=str(MALFORMED / "too_long.jsonl"), max_length=16)
    rows = load_canonical(cfg)
    with pytest.raises(DataError, match=r"row 1, field 'completions'.*over data.max_length=16"):
        tokenize_rows(rows, tiny_tokenizer, cfg, cfg.path)
    cfg.too_long = "drop"
    kept, dropped = tokenize_rows(rows, tiny_tokenizer, cfg, cfg.path)
    assert (len(kept), dropped) == (1, 1)


def _write(path: Path, rows, jsonl=True):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) if jsonl else json.dumps(rows))
    return str(path)


def test_formats_convert_to_the_canonical_schema(tmp_path):
    chat = [{"role": "user", "content": "sort 3 1"}]
    grouped = _write(
        tmp_path / "g.json",
        [
            {
                "prompt": chat,
                "responses": [
                    {"text": "1 3", "reward": 1.0},
                    {"text": "3 1", "reward": 0.0},
                    {"text": "1 3", "reward": 1.0},
                ],
            }
        ],
        jsonl=False,
    )
    pairs = _write(
        tmp_path / "p.jsonl",
        [
            {
                "prompt": chat,
                "chosen": [*chat, {"role": "assistant", "content": "1 3"}],
                "rejected": [*chat, {"role": "assistant", "content": "3 1"}],
                "score_chosen": 9.0,
                "score_rejected": 2.5,
            }
        ],
    )
    point = _write(
        tmp_path / "w.jsonl",
        [
            {
                "prompt": "sort 3 1",
                "completion": "1 3",
                "reward": 0.7,
                "ref_rewards": [0.1, 0.9],
                "ref_logp": -3.5,
            }
        ],
    )
    (g,) = load_canonical(DataConfig(path=grouped), require_rewards=True)
    assert g["messages"] == chat and g["prompt"] == ""
    assert g["ref_rewards"] == [1.0, 0.0, 1.0]
    assert [c["ref_index"] for c in g["completions"]] == [0, 1, 2]
    assert (
        len({c["completion_id"] for c in g["completions"]}) == 3
    )  # repeated samples stay distinct
    (p,) = load_canonical(DataConfig(path=pairs), require_pairs=True)
    assert [c["text"] for c in p["completions"]] == ["1 3", "3 1"]
    assert [c["reward"] for c in p["completions"]] == [9.0, 2.5]
    assert (p["chosen"], p["rejected"]) == (0, 1)
    assert p["prompt_id"] == g["prompt_id"]  # same prompt, same id, whatever the file
    (w,) = load_canonical(DataConfig(path=point, min_ref_rewards=2))
    assert w["prompt"] == "sort 3 1" and w["completions"][0]["ref_logp"] == -3.5
    with pytest.raises(DataError, match="needs chosen/rejected pairs"):
        load_canonical(DataConfig(path=point), require_pairs=True)


def test_parquet_and_folders_load_through_datasets(tmp_path):
    import datasets

    rows = [{"prompt": f"p{i}", "completion": f"c{i}", "reward": float(i)} for i in range(5)]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "part-0.parquet"))
    out = load_canonical(DataConfig(path=str(tmp_path)), require_rewards=True)
    assert [r["completions"][0]["reward"] for r in out] == [0, 1, 2, 3, 4]


@pytest.fixture(scope="module")
def tiny_tokenizer():
    return load_tokenizer(ModelConfig())


def test_chat_prompt_masking_and_eos(tiny_tokenizer, tmp_path):
    path = _write(
        tmp_path / "d.jsonl",
        [{"prompt": [{"role": "user", "content": "sort 2 1"}], "completion": "1 2", "reward": 1.0}],
    )
    cfg = DataConfig(path=path)
    (row,), _ = tokenize_rows(load_canonical(cfg), tiny_tokenizer, cfg, path)
    prompt, completion = row["prompt_ids"], row["completions"][0]["completion_ids"]
    assert completion[-1] == tiny_tokenizer.eos_token_id
    text = tiny_tokenizer.decode(prompt)
    assert text.startswith("<|user|>sort 2 1") and text.endswith("<|assistant|>")
    ids = prompt + completion
    targets = shifted_targets(ids, len(prompt))
    scored = [t for t in targets if t != -100]
    assert scored == completion  # exactly the completion tokens, EOS included, nothing else
    assert targets[len(prompt) - 1] == completion[0] and targets[-1] == -100
