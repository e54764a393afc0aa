"""One source row -> one canonical row, checked field by field (see qrpo.common.data for the formats).

Every problem raises `DataError` naming the file, the row and the field *as the input spells it*:
`rejected[1].role`, `responses[2].reward`, `completion`, `completions[0].ref_logp` (canonical
input). A canonical row remembers those names in `origin`, so that checks made later (the
tokenizer's, the length limit) name them too:

    origin = {"file": str, "row": int,             # where the row is
              "prompt": "prompt",                   # the prompt's field
              "completions": ["chosen", ...],       # each completion's text field
              "ids": ["chosen", ...],               # where each completion's id comes from
              "ref_rewards": "ref_rewards",         # where the reference rewards come from
              "roles": [["rejected[1].role", "assistant"], ...]}   # every message's role
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

CANONICAL_COLUMNS = (
    "prompt_id",
    "prompt",
    "messages",
    "completions",
    "ref_rewards",
    "chosen",
    "rejected",
    "source_row",
)


class DataError(ValueError):
    """A data problem, located: file, row (0-based) and field."""

    def __init__(self, source: str, row: int | None, field: str | None, problem: str):
        self.source, self.row, self.field, self.problem = source, row, field, problem
        where = source
        if row is not None:
            where += f", row {row}"
        if field is not None:
            where += f", field '{field}'"
        super().__init__(f"{where}: {problem}")


def content_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


class RowReader:
    """Field access for one source row that reports problems with their location, and records
    the role of every message it reads (for the tokenizer's check)."""

    def __init__(self, row: Any, index: int, source: str):
        if not isinstance(row, dict):
            raise DataError(source, index, None, f"expected an object, got {_type(row)}")
        self.row, self.index, self.source = row, index, source
        self.roles: list[list[str]] = []

    def error(self, field: str, problem: str) -> DataError:
        return DataError(self.source, self.index, field, problem)

    def get(self, field: str, required: bool = True) -> Any:
        value = self.row.get(field)
        if value is None and required:
            raise self.error(field, "missing")
        return value

    def number(self, value: Any, field: str, required: bool) -> float | None:
        if value is None:
            if required:
                raise self.error(field, "missing reward")
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise self.error(field, f"not a number: {value!r}")
        if not math.isfinite(value):
            raise self.error(field, f"not finite: {value}")
        return float(value)

    def numbers(self, field: str, value: Any = None) -> list[float]:
        values = self.row.get(field) if value is None else value
        if values is None:
            return []
        if not isinstance(values, (list, tuple)):
            raise self.error(field, f"expected a list of numbers, got {_type(values)}")
        return [self.number(v, f"{field}[{k}]", True) for k, v in enumerate(values)]

    def bounded_index(self, value: Any, field: str, size: int, what: str) -> int:
        """-1 or an index in [0, size)."""
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(field, f"expected an integer index, got {value!r}")
        if not -1 <= value < size:
            raise self.error(field, f"{value} is out of range: -1 or an index into {size} {what}")
        return value

    def string(self, value: Any, field: str) -> str:
        if value is None:
            raise self.error(field, "missing")
        if not isinstance(value, str):
            raise self.error(field, f"expected a string, got {_type(value)}")
        return value

    def messages(self, value: Any, field: str) -> list[dict]:
        """A list of {'role': str, 'content': str}, every message checked."""
        if not isinstance(value, list) or not value:
            raise self.error(field, f"expected a non-empty list of messages, got {_type(value)}")
        out = []
        for k, m in enumerate(value):
            where = f"{field}[{k}]"
            if not isinstance(m, dict):
                raise self.error(where, f"expected a message {{'role', 'content'}}, got {_type(m)}")
            role = self.string(m.get("role"), f"{where}.role")
            if not role.strip():
                raise self.error(f"{where}.role", "empty role")
            content = self.string(m.get("content"), f"{where}.content")
            self.roles.append([f"{where}.role", role])
            out.append({"role": role, "content": content})
        return out

    def text(self, value: Any, field: str) -> str:
        """A completion: a string, or a message list whose last message, the assistant's, is it."""
        if isinstance(value, list):
            messages = self.messages(value, field)
            if messages[-1]["role"] != "assistant":
                raise self.error(
                    f"{field}[{len(messages) - 1}].role",
                    f"the completion is the last message and must have role 'assistant', got "
                    f"'{messages[-1]['role']}'",
                )
            field, value = f"{field}[{len(messages) - 1}].content", messages[-1]["content"]
        if not isinstance(value, str):
            raise self.error(field, f"expected text or a message list, got {_type(value)}")
        if not value.strip():
            raise self.error(field, "empty completion")
        return value

    def prompt(self, field: str = "prompt") -> tuple[str, list[dict]]:
        value = self.get(field)
        if isinstance(value, str):
            if not value.strip():
                raise self.error(field, "empty prompt")
            return value, []
        if isinstance(value, list) and value:
            messages = self.messages(value, field)
            if not any(m["content"].strip() for m in messages):
                raise self.error(field, "empty prompt")
            return "", messages
        raise self.error(field, f"expected text or a non-empty message list, got {value!r:.60}")


def to_canonical(row: dict, index: int, fmt: str, source: str, require_rewards: bool) -> dict:
    """One source row in `fmt` -> one canonical row; raises DataError naming the field."""
    if fmt == "canonical":
        return from_canonical(row, index, source, require_rewards)
    r = RowReader(row, index, source)
    prompt, messages = r.prompt()
    given_id = row.get("prompt_id")
    if given_id is not None and (
        not isinstance(given_id, (str, int)) or isinstance(given_id, bool)
    ):
        raise r.error("prompt_id", f"expected a string, got {_type(given_id)}")
    prompt_id = str(given_id) if given_id not in (None, "") else content_hash(messages or prompt)
    ref_rewards = r.numbers("ref_rewards")
    refs_field, chosen, rejected = "ref_rewards", -1, -1
    fields: list[str] = []
    ids: list[str] = []
    if fmt == "grouped":
        responses = r.get("responses")
        if not isinstance(responses, list) or not responses:
            raise r.error("responses", "expected a non-empty list of {'text', 'reward'}")
        own_refs = row.get("ref_rewards") is None
        completions = []
        for j, resp in enumerate(responses):
            field = f"responses[{j}]"
            if not isinstance(resp, dict):
                raise r.error(field, "expected {'text': ..., 'reward': ...}")
            text = r.text(resp.get("text"), f"{field}.text")
            reward = resp.get("reward")
            if reward is None and require_rewards:
                raise r.error(f"{field}.reward", "missing reward")
            completions.append(
                {
                    "completion_id": f"{prompt_id}:{j}",
                    "text": text,
                    "reward": r.number(reward, f"{field}.reward", require_rewards),
                    "ref_logp": r.number(resp.get("ref_logp"), f"{field}.ref_logp", False),
                    "ref_index": j if own_refs else -1,
                }
            )
            fields.append(f"{field}.text")
        ids = fields
        if own_refs:
            ref_rewards = [c["reward"] for c in completions if c["reward"] is not None]
            refs_field = "responses"
    elif fmt == "pairs":
        completions = []
        # Both texts (and their messages) first: a broken message is the problem to report,
        # before a missing score.
        texts = [r.text(r.get(name), name) for name in ("chosen", "rejected")]
        for name, text in zip(("chosen", "rejected"), texts):
            score = f"score_{name}"
            reward = r.number(row.get(score), score, require_rewards)
            completions.append(
                {
                    "completion_id": f"{prompt_id}:{content_hash(text)[:12]}",
                    "text": text,
                    "reward": reward,
                    "ref_logp": r.number(row.get(f"ref_logp_{name}"), f"ref_logp_{name}", False),
                    "ref_index": -1,
                }
            )
            fields.append(name)
        ids = fields
        if completions[0]["text"] == completions[1]["text"]:
            raise r.error("rejected", "identical to 'chosen'")
        chosen, rejected = 0, 1
    elif fmt == "pointwise":
        text = r.text(r.get("completion"), "completion")
        ref_index = row.get("ref_index")
        if ref_index is not None:
            ref_index = r.bounded_index(ref_index, "ref_index", len(ref_rewards), "ref_rewards")
        given = row.get("completion_id")
        if given is not None and not isinstance(given, str):
            raise r.error("completion_id", f"expected a string, got {_type(given)}")
        completions = [
            {
                "completion_id": given or f"{prompt_id}:{content_hash(text)[:12]}",
                "text": text,
                "reward": r.number(row.get("reward"), "reward", require_rewards),
                "ref_logp": r.number(row.get("ref_logp"), "ref_logp", False),
                "ref_index": -1 if ref_index is None else ref_index,
            }
        ]
        fields, ids = ["completion"], ["completion_id" if given else "completion"]
    else:
        raise DataError(source, index, None, f"unknown format '{fmt}'")
    return {
        "prompt_id": prompt_id,
        "prompt": prompt,
        "messages": messages,
        "completions": completions,
        "ref_rewards": ref_rewards,
        "chosen": chosen,
        "rejected": rejected,
        "source_row": index,
        "origin": {
            "file": source,
            "row": index,
            "prompt": "prompt",
            "completions": fields,
            "ids": ids,
            "ref_rewards": refs_field,
            "roles": r.roles,
        },
    }


def from_canonical(row: Any, index: int, source: str, require_rewards: bool) -> dict:
    """A row already in the canonical schema (a merged file of the generate pipeline, ...),
    checked as closely as the other formats: nothing reaches training unchecked."""
    r = RowReader(row, index, source)
    for column in CANONICAL_COLUMNS:
        if column not in row:
            raise r.error(column, "missing")
    prompt_id = r.string(row["prompt_id"], "prompt_id")
    if not prompt_id:
        raise r.error("prompt_id", "empty id")
    prompt = r.string(row["prompt"], "prompt")
    messages = row["messages"] or []
    if messages:
        messages = r.messages(messages, "messages")
        if not any(m["content"].strip() for m in messages):
            raise r.error("messages", "empty prompt")
    elif not prompt.strip():
        raise r.error("prompt", "empty prompt")
    ref_rewards = r.numbers("ref_rewards")
    completions = row["completions"]
    if not isinstance(completions, list) or not completions:
        raise r.error("completions", f"expected a non-empty list, got {_type(completions)}")
    out = []
    for j, c in enumerate(completions):
        field = f"completions[{j}]"
        if not isinstance(c, dict):
            raise r.error(field, f"expected an object, got {_type(c)}")
        text = r.string(c.get("text"), f"{field}.text")
        if not text.strip():
            raise r.error(f"{field}.text", "empty completion")
        completion_id = r.string(c.get("completion_id"), f"{field}.completion_id")
        ref_index = c.get("ref_index")
        out.append(
            {
                "completion_id": completion_id,
                "text": text,
                "reward": r.number(c.get("reward"), f"{field}.reward", require_rewards),
                "ref_logp": r.number(c.get("ref_logp"), f"{field}.ref_logp", False),
                "ref_index": -1
                if ref_index is None
                else r.bounded_index(
                    ref_index, f"{field}.ref_index", len(ref_rewards), "ref_rewards"
                ),
            }
        )
    chosen = r.bounded_index(row["chosen"], "chosen", len(out), "completions")
    rejected = r.bounded_index(row["rejected"], "rejected", len(out), "completions")
    if (chosen < 0) != (rejected < 0) or (chosen >= 0 and chosen == rejected):
        raise r.error("rejected", f"chosen={chosen} and rejected={rejected} are not a pair")
    prompt_field = "messages" if messages else "prompt"
    return {
        **row,
        "prompt_id": prompt_id,
        "prompt": prompt,
        "messages": messages,
        "completions": out,
        "ref_rewards": ref_rewards,
        "chosen": chosen,
        "rejected": rejected,
        "source_row": index,
        "origin": {
            "file": source,
            "row": index,
            "prompt": prompt_field,
            "completions": [f"completions[{j}].text" for j in range(len(out))],
            "ids": [f"completions[{j}].completion_id" for j in range(len(out))],
            "ref_rewards": "ref_rewards",
            "roles": r.roles,
        },
    }
