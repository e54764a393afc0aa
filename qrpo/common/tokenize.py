"""Tokenization of canonical rows: prompt via the chat template, completion + EOS, no truncation.

A sequence is `prompt_ids + completion_ids`. Targets are already shifted for the log-prob
kernel: `targets[t]` is the token predicted at position t, and only completion tokens count:

    input_ids : p0 p1 p2 c0 c1 EOS
    targets   : -100 -100 c0 c1 EOS -100

Before anything is encoded, every message role of the data (prompt and completion message
lists) must be one the tokenizer's chat template accepts: a template that raises on a role, or
renders nothing of a message with it, does not. Errors name the file, row and field as the
input spells them (the rows' `origin`, see qrpo.common.rows).
"""

from __future__ import annotations

import difflib

from qrpo.common.constants import IGNORE_INDEX
from qrpo.common.data import DataConfig, DataError

COMMON_ROLES = ("system", "user", "assistant", "tool")
_PROBE = {"content": "q7x3v9"}  # a content no template writes by itself
_USER, _ASSISTANT = {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}
# Templates differ in where a role may stand (a system message only first, roles alternating
# after it): a role is accepted when it renders in one of these places.
_PLACES = ((), (_USER,), (_USER, _ASSISTANT))


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


class TemplateRoles:
    """Which roles a tokenizer's chat template accepts, found by rendering (cached per role)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.known: dict[str, bool] = {}

    def accepts(self, role: str) -> bool:
        if role not in self.known:
            probe = {**_PROBE, "role": role}
            self.known[role] = any(
                self._renders(conversation)
                for before in _PLACES
                for conversation in ([*before, probe], [*before, probe, _USER])
            )
        return self.known[role]

    def _renders(self, messages: list[dict]) -> bool:
        try:
            text = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception:  # the template's raise_exception, or an error of its own
            return False
        return _PROBE["content"] in text

    def problem(self, role: str) -> str:
        ok = [r for r in COMMON_ROLES if self.accepts(r)]
        near = difflib.get_close_matches(role.lower(), ok, n=1, cutoff=0.5)
        return (
            f"role '{role}' is not accepted by the tokenizer's chat template (it accepts "
            f"{', '.join(ok) or 'none of ' + ', '.join(COMMON_ROLES)})"
            + (f"; did you mean '{near[0]}'?" if near else "")
        )


def _origin(row: dict, source: str) -> dict:
    """Where the row came from; rows built without qrpo.common.data (the generate steps' own) are
    named by the canonical fields."""
    if "origin" in row:
        return row["origin"]
    n = len(row["completions"])
    return {
        "file": source,
        "row": row["source_row"],
        "prompt": "messages" if row["messages"] else "prompt",
        "completions": [f"completions[{j}].text" for j in range(n)],
        "roles": [[f"messages[{k}].role", m["role"]] for k, m in enumerate(row["messages"])],
    }


def check_roles(rows: list[dict], tokenizer, source: str) -> None:
    """Every message role of every row must be one the chat template accepts."""
    if not getattr(tokenizer, "chat_template", None):
        for row in rows:
            if row["messages"]:
                origin = _origin(row, source)
                raise DataError(
                    origin["file"],
                    origin["row"],
                    origin["prompt"],
                    "the prompt is a message list but the tokenizer has no chat template",
                )
        return
    roles = TemplateRoles(tokenizer)
    for row in rows:
        origin = _origin(row, source)
        for field, role in origin["roles"]:
            if not roles.accepts(role):
                raise DataError(origin["file"], origin["row"], field, roles.problem(role))


def tokenize_rows(
    rows: list[dict], tokenizer, cfg: DataConfig, source: str
) -> tuple[list[dict], int]:
    """Add `prompt_ids` to each row and `completion_ids` to each completion.

    Sequences longer than `cfg.max_length` raise DataError (default) or, with
    `too_long=drop`, remove the row; the number of dropped rows is returned for reporting.
    """
    check_roles(rows, tokenizer, source)
    kept, dropped = [], 0
    for row in rows:
        origin = _origin(row, source)
        try:
            prompt_ids = encode_prompt(tokenizer, row["prompt"], row["messages"])
        except Exception as err:  # the template refuses this conversation (order of roles...)
            raise DataError(
                origin["file"],
                origin["row"],
                origin["prompt"],
                f"the tokenizer's chat template refuses it: {err}",
            ) from None
        if not prompt_ids:
            raise DataError(origin["file"], origin["row"], origin["prompt"], "encodes to no tokens")
        completions, too_long = [], None
        for j, c in enumerate(row["completions"]):
            ids = encode_completion(tokenizer, c["text"])
            if too_long is None and len(prompt_ids) + len(ids) > cfg.max_length:
                too_long = (j, len(prompt_ids) + len(ids))
            completions.append({**c, "completion_ids": ids})
        if too_long is not None:
            if cfg.too_long == "error":
                raise DataError(
                    origin["file"],
                    origin["row"],
                    origin["completions"][too_long[0]],
                    f"prompt+completion is {too_long[1]} tokens, over data.max_length="
                    f"{cfg.max_length} (set data.too_long=drop to skip such rows)",
                )
            dropped += 1
            continue
        kept.append({**row, "prompt_ids": prompt_ids, "completions": completions})
    if not kept:
        raise DataError(source, None, None, f"all {len(rows)} rows are over data.max_length")
    return kept, dropped
