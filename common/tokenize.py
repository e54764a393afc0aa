"""Tokenization of canonical rows: prompt via the chat template, completion + EOS, no truncation.

A sequence is `prompt_ids + completion_ids`. Targets are already shifted for the log-prob
kernel: `targets[t]` is the token predicted at position t, and only completion tokens count:

    input_ids : p0 p1 p2 c0 c1 EOS
    targets   : -100 -100 c0 c1 EOS -100
"""

from __future__ import annotations

from common.constants import IGNORE_INDEX
from common.data import DataConfig, DataError


def encode_prompt(tokenizer, prompt: str, messages: list[dict]) -> list[int]:
    if messages:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("prompts are chat messages but the tokenizer has no chat_template")
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        # The template writes any BOS itself; adding special tokens again would double it.
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(prompt)["input_ids"]


def encode_completion(tokenizer, text: str) -> list[int]:
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token: completions must end with EOS")
    return [*ids, tokenizer.eos_token_id]


def shifted_targets(input_ids: list[int], prompt_len: int) -> list[int]:
    """Targets for the log-prob kernel: completion tokens at the position that predicts them."""
    n = len(input_ids)
    return [
        input_ids[t + 1] if t + 1 >= prompt_len and t + 1 < n else IGNORE_INDEX for t in range(n)
    ]


def tokenize_rows(
    rows: list[dict], tokenizer, cfg: DataConfig, source: str
) -> tuple[list[dict], int]:
    """Add `prompt_ids` to each row and `completion_ids` to each completion.

    Sequences longer than `cfg.max_length` raise DataError (default) or, with
    `too_long=drop`, remove the row; the number of dropped rows is returned for reporting.
    """
    kept, dropped = [], 0
    for row in rows:
        prompt_ids = encode_prompt(tokenizer, row["prompt"], row["messages"])
        if not prompt_ids:
            raise DataError(source, row["source_row"], "prompt", "prompt encodes to no tokens")
        completions, too_long = [], None
        for j, c in enumerate(row["completions"]):
            ids = encode_completion(tokenizer, c["text"])
            if len(prompt_ids) + len(ids) > cfg.max_length:
                too_long = (j, len(prompt_ids) + len(ids))
            completions.append({**c, "completion_ids": ids})
        if too_long is not None:
            if cfg.too_long == "error":
                raise DataError(
                    source,
                    row["source_row"],
                    "completions",
                    f"completion {too_long[0]}: prompt+completion is {too_long[1]} "
                    f"tokens, over data.max_length={cfg.max_length} (set "
                    "data.too_long=drop to skip such rows)",
                )
            dropped += 1
            continue
        kept.append({**row, "prompt_ids": prompt_ids, "completions": completions})
    if not kept:
        raise DataError(source, None, None, f"all {len(rows)} rows are over data.max_length")
    return kept, dropped
