"""The embedded default: tokenizer, model and graded task build offline and behave."""

import random

from qrpo.common.tiny import TASK, ensure_tiny, write_task_data


def test_tiny_builds_once_and_loads_with_auto_classes(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = ensure_tiny(tmp_path / "tiny")
    assert ensure_tiny(tmp_path / "tiny") == path  # second call reuses the directory
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    assert model.config.tie_word_embeddings
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert model.config.vocab_size == len(tok)
    msgs = [{"role": "user", "content": "sort 5 2 9"}]
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_tokenizer_is_deterministic(tmp_path):
    a = ensure_tiny(tmp_path / "a") / "tokenizer.json"
    b = ensure_tiny(tmp_path / "b") / "tokenizer.json"
    assert a.read_text() == b.read_text()


def test_reward_is_graded():
    p = [{"role": "user", "content": "sort 4 1 3 1"}]
    assert TASK.reward(p, "1 1 3 4") == 1.0
    assert TASK.reward(p, "1 1 4 3") == 0.5
    assert TASK.reward(p, "1 1 3") == 0.75  # a missing digit costs its position
    assert TASK.reward(p, "1 1 3 4 4") == 0.8  # an extra one dilutes the rest
    assert TASK.reward(p, "x y") == 0.0


def test_noisy_demonstrations_make_a_mediocre_teacher(tmp_path):
    paths = write_task_data(tmp_path, n_sft=400, n_train=10, n_eval=10)
    import json

    rows = [json.loads(line) for line in paths["sft"].read_text().splitlines()]
    rewards = [r["reward"] for r in rows]
    mean = sum(rewards) / len(rewards)
    assert 0.6 < mean < 0.95  # room for a better policy
    assert len(set(rewards)) > 5  # graded, not pass/fail
    train = {json.dumps(r) for r in paths["train_prompts"].read_text().splitlines()}
    held = {json.dumps(r) for r in paths["eval_prompts"].read_text().splitlines()}
    assert len(train) == 10 and len(held) == 10
    rng = random.Random(0)
    p = TASK.prompts("eval", 1)[0]
    assert TASK.reward(p, TASK.demonstration(p, rng, noise=0.0)) == 1.0
