"""Data formats -> canonical schema, and one clear error per malformed file."""

import json
from pathlib import Path

import pytest

from qrpo.common.data import DataConfig, DataError, load_canonical
from qrpo.common.model import ModelConfig, load_tokenizer
from qrpo.common.tokenize import shifted_targets, tokenize_rows

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
    ("duplicate_ids.jsonl", False, 0, 2, "completion", "first seen in row 0"),
    ("wrong_type_prompt.jsonl", False, 0, 1, "prompt", "expected text"),
    ("grouped_missing_reward.jsonl", True, 0, 0, "responses[1].reward", "missing reward"),
    ("grouped_not_list.jsonl", False, 0, 0, "responses", "non-empty list"),
    ("pairs_missing_rejected.jsonl", False, 0, 1, "rejected", "missing"),
    ("pairs_identical.jsonl", False, 0, 0, "rejected", "identical"),
    ("broken_json.jsonl", False, 0, 1, None, "invalid JSON on line 2"),
    ("unknown_format.jsonl", False, 0, None, None, "cannot tell the format"),
    # Every message of every message list: an object with a string role and content.
    ("pairs_message_without_role.jsonl", False, 0, 0, "rejected[1].role", "missing"),
    ("pairs_last_message_not_assistant.jsonl", False, 0, 1, "rejected[1].role", "'assistant'"),
    ("message_role_not_string.jsonl", False, 0, 1, "prompt[0].role", "expected a string, got int"),
    ("completion_message_not_object.jsonl", False, 0, 0, "completion[0]", "expected a message"),
    (
        "grouped_message_without_content.jsonl",
        False,
        0,
        0,
        "responses[1].text[0].content",
        "missing",
    ),
    # Precomputed reference log-probs and reference indices, in every format.
    ("nan_ref_logp.jsonl", False, 0, 1, "ref_logp", "not finite: nan"),
    ("string_ref_logp.jsonl", False, 0, 0, "ref_logp_rejected", "not a number: 'low'"),
    ("canonical_inf_ref_logp.jsonl", False, 0, 1, "completions[0].ref_logp", "not finite: inf"),
    ("canonical_ref_index.jsonl", False, 0, 1, "completions[0].ref_index", "-3 is out of range"),
    ("ref_index_out_of_range.jsonl", False, 0, 1, "ref_index", "2 is out of range"),
    ("ref_index_bool.jsonl", False, 0, 0, "ref_index", "expected an integer index, got True"),
    # A Latin-1 file: the row and the byte are named, not a UnicodeDecodeError traceback.
    ("latin1_prompt.jsonl", False, 0, 1, None, "not UTF-8 text: byte 0xe9 on line 2, column 16"),
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


def test_a_non_utf8_json_array_names_the_file_and_line(tmp_path):
    path = tmp_path / "rows.json"
    text = (
        '[\n  {"prompt": "a", "completion": "b"},\n  {"prompt": "caf\u00e9", "completion": "b"}\n]'
    )
    path.write_bytes(text.encode("latin-1"))
    with pytest.raises(DataError, match=r"rows.json: not UTF-8 text: byte 0xe9 on line 3"):
        load_canonical(DataConfig(path=str(path)))


def test_too_long_errors_or_drops(tiny_tokenizer):
    cfg = DataConfig(path=str(MALFORMED / "too_long.jsonl"), max_length=16)
    rows = load_canonical(cfg)
    # The field as the file spells it (pointwise: `completion`), not the canonical schema's name.
    with pytest.raises(DataError, match=r"row 1, field 'completion': .*over data.max_length=16"):
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


def test_a_prompt_id_given_to_two_prompts_across_files_of_a_folder(tmp_path):
    _write(tmp_path / "a.jsonl", [{"prompt_id": "p1", "prompt": "sort 1 2", "completion": "1 2"}])
    _write(
        tmp_path / "b.jsonl",
        [
            {"prompt_id": "p0", "prompt": "sort 5 4", "completion": "4 5"},
            {"prompt_id": "p1", "prompt": "sort 3 4", "completion": "3 4"},
        ],
    )
    with pytest.raises(DataError) as info:
        load_canonical(DataConfig(path=str(tmp_path)))
    err = info.value
    assert (err.source, err.row, err.field) == (str(tmp_path / "b.jsonl"), 1, "prompt_id")
    assert f"different prompt in {tmp_path / 'a.jsonl'}, row 0" in str(err)
    # The same id for the same prompt is one prompt seen twice: fine.
    _write(tmp_path / "b.jsonl", [{"prompt_id": "p1", "prompt": "sort 1 2", "completion": "2 1"}])
    assert len(load_canonical(DataConfig(path=str(tmp_path)))) == 2


def test_a_parquet_column_of_the_wrong_type_is_named_in_its_file(tmp_path):
    import datasets

    good = [{"prompt": f"p{i}", "completion": f"c{i}", "reward": float(i)} for i in range(3)]
    datasets.Dataset.from_list(good).to_parquet(str(tmp_path / "part-0.parquet"))
    bad = [{"prompt": "q", "completion": "d", "reward": "0.5"}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "part-1.parquet"))
    with pytest.raises(DataError) as info:
        load_canonical(DataConfig(path=str(tmp_path)), require_rewards=True)
    err = info.value
    assert (err.source, err.row, err.field) == (str(tmp_path / "part-1.parquet"), 0, "reward")
    assert "not a number: '0.5'" in str(err)


def test_canonical_parquet_is_checked_like_the_other_formats(tmp_path):
    import datasets

    def row(i, ref_logp):
        completion = {"completion_id": f"c{i}", "text": "1 2", "reward": 1.0, "ref_logp": ref_logp}
        return {
            "prompt_id": f"p{i}",
            "prompt": "sort 2 1",
            "messages": [],
            "completions": [{**completion, "ref_index": 0}],
            "ref_rewards": [1.0],
            "chosen": -1,
            "rejected": -1,
            "source_row": 40 + i,  # the pipeline's first input: not this file's row
        }

    path = str(tmp_path / "ref_logps.parquet")
    datasets.Dataset.from_list([row(0, -1.5), row(1, float("nan"))]).to_parquet(path)
    with pytest.raises(DataError, match=r"row 1, field 'completions\[0\].ref_logp': not finite"):
        load_canonical(DataConfig(path=path))


STRICT_TEMPLATE = (  # as real templates do: raise on a role they do not know
    "{% for m in messages %}{% if m['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('unknown role ' + m['role']) }}{% endif %}"
    "<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


@pytest.mark.parametrize(
    "row,field",
    [
        (
            {"prompt": [{"role": "usr", "content": "sort 2 1"}], "completion": "1 2"},
            "prompt[0].role",
        ),
        (
            {
                "prompt": "sort 2 1",
                "chosen": [{"role": "assistant", "content": "1 2"}],
                "rejected": [
                    {"role": "tool", "content": "x"},
                    {"role": "assistant", "content": "2"},
                ],
            },
            "rejected[0].role",
        ),
    ],
)
def test_message_roles_must_be_ones_the_chat_template_accepts(tmp_path, row, field):
    from transformers import AutoTokenizer

    from qrpo.common.model import resolve

    tokenizer = AutoTokenizer.from_pretrained(resolve("tiny"))
    tokenizer.chat_template = STRICT_TEMPLATE
    path = _write(tmp_path / "d.jsonl", [row])
    cfg = DataConfig(path=path)
    rows = load_canonical(cfg)
    with pytest.raises(DataError) as info:
        tokenize_rows(rows, tokenizer, cfg, path)
    err = info.value
    assert (err.row, err.field) == (0, field), str(err)
    assert "not accepted by the tokenizer's chat template (it accepts system, user, assistant)" in (
        str(err)
    )
    if field.startswith("prompt"):
        assert str(err).endswith("did you mean 'user'?")


SYSTEM_FIRST_TEMPLATE = (  # as Llama-2's: system only first, then user/assistant, nothing else
    "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
    "{% set msgs = messages[1:] %}{% else %}{% set sys = '' %}{% set msgs = messages %}{% endif %}"
    "{% for m in msgs %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
    "{% if loop.first and sys %}<<SYS>>{{ sys }}<</SYS>>{% endif %}"
    "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
    "{% elif m['role'] == 'assistant' %}{{ m['content'] }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def test_a_conversation_the_template_refuses_is_named(tmp_path):
    from transformers import AutoTokenizer

    from qrpo.common.model import resolve
    from qrpo.common.tokenize import TemplateRoles

    tokenizer = AutoTokenizer.from_pretrained(resolve("tiny"))
    tokenizer.chat_template = SYSTEM_FIRST_TEMPLATE
    roles = TemplateRoles(tokenizer)
    assert [roles.accepts(r) for r in ("system", "user", "assistant", "tool")] == [1, 1, 1, 0]
    system = {"role": "system", "content": "be brief"}
    user = {"role": "user", "content": "sort 2 1"}
    path = _write(
        tmp_path / "d.jsonl",
        [
            {"prompt": [system, user], "completion": "1 2"},
            {"prompt": [user, {**user, "content": "sort 3 1"}], "completion": "1 3"},
        ],
    )
    cfg = DataConfig(path=path)
    with pytest.raises(DataError) as info:
        tokenize_rows(load_canonical(cfg), tokenizer, cfg, path)
    assert (info.value.row, info.value.field) == (1, "prompt")
    assert "chat template refuses it: roles must alternate user/assistant" in str(info.value)
