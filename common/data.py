"""Data formats, the canonical schema, and validation before any model is loaded.

Three input formats are recognised from their columns (local JSON/JSONL/Parquet through
`datasets`, or a hub dataset name where a hub is reachable):

- grouped (the reward-partitioning project's format):
  `{"prompt": ..., "responses": [{"text": ..., "reward": ...}, ...]}`. Without a `ref_rewards`
  column the responses are taken to be the reference samples: their rewards become the prompt's
  reference rewards and each response knows its own index among them (`ref_index`).
- pairs (TRL): `{"prompt", "chosen", "rejected"}`, optional `score_chosen`/`score_rejected`;
  strings or chat-message lists (the completion is the last assistant message).
- pointwise: `{"prompt", "completion", "reward"}`, optional `ref_rewards` (K floats),
  `ref_logp`, `ref_index`.

Every format becomes the canonical schema, one row per prompt occurrence:

    prompt_id    str                  stable id (given, or a hash of the prompt)
    prompt       str                  plain-text prompt ("" when the prompt is chat messages)
    messages     list[{role, content}] chat prompt ([] for plain text)
    completions  list[{completion_id: str, text: str, reward: float|None,
                       ref_logp: float|None, ref_index: int (-1: not a reference sample)}]
    ref_rewards  list[float]          rewards of the reference model's samples for this prompt
    chosen       int                  index into completions of the preferred one, -1 if no pair
    rejected     int                  index of the dispreferred one, -1 if no pair
    source_row   int                  row index in the source file (0-based), for messages

Rows are checked one by one; the first problem raises `DataError` naming file, row and field.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.config import ConfigError, choice, doc

FORMATS = ("auto", "grouped", "pairs", "pointwise", "canonical")
TOO_LONG = ("error", "drop")
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


@dataclass
class DataConfig:
    path: str = doc("", "JSON/JSONL/Parquet file or folder, or a hub dataset name")
    split: str = doc("train", "split to read (files load as a single 'train' split)")
    format: str = choice("auto", FORMATS, "input format (auto: told by the columns)")
    max_length: int = doc(1024, "max prompt+completion tokens per sequence")
    too_long: str = choice("error", TOO_LONG, "longer sequences: stop, or drop the row and report")
    min_ref_rewards: int = doc(0, "fewest reference rewards a prompt may have")
    max_rows: int = doc(0, "read at most this many rows (0: all), for quick runs")

    def __post_init__(self):
        if self.max_length < 2:
            raise ConfigError("data.max_length must be >= 2")


# --------------------------------------------------------------------------- reading


def _builder(path: Path) -> str:
    suffixes = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in suffixes)
    if not files:
        raise DataError(str(path), None, None, "no .json, .jsonl or .parquet files found")
    kinds = {suffixes.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise DataError(str(path), None, None, "expected .json/.jsonl or .parquet files, one kind")
    return kinds.pop()


def _read_json_rows(path: Path) -> list[dict]:
    """Plain-Python reading, used to locate a row that Arrow refused to load."""
    text = path.read_text()
    if path.suffix == ".json" and text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(str(path), None, None, f"invalid JSON: {err}") from None
        return rows
    rows = []
    for i, line in enumerate(text.splitlines()):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise DataError(
                str(path), len(rows), None, f"invalid JSON on line {i + 1}: {err}"
            ) from None
    return rows


def read_rows(path: str, split: str = "train") -> tuple[list[dict], str]:
    """Rows as Python dicts, through `datasets`; returns (rows, source name for messages)."""
    import datasets

    local = Path(path)
    if not path:
        raise ConfigError("data.path is empty: give a JSON/JSONL/Parquet file or a dataset name")
    if not local.exists():
        try:
            ds = datasets.load_dataset(path, split=split)
        except Exception as err:  # hub unreachable, unknown name, ...
            raise DataError(path, None, None, f"not a local file and not loadable: {err}") from None
        return list(ds), path
    builder = _builder(local)
    files = (
        [str(local)]
        if local.is_file()
        else [
            str(p) for p in sorted(local.iterdir()) if p.suffix in (".json", ".jsonl", ".parquet")
        ]
    )
    try:
        ds = datasets.load_dataset(builder, data_files=files, split="train")
        return list(ds), str(local)
    except Exception as err:
        # Arrow rejects rows whose types change (a reward given as a string, ...). Re-read in
        # Python so validation can name the row and field; if it finds nothing, re-raise.
        if builder != "json" or len(files) != 1:
            raise DataError(str(local), None, None, f"could not be loaded: {err}") from None
        return _read_json_rows(local), str(local)


# --------------------------------------------------------------------------- conversion


def detect_format(columns: set[str], source: str) -> str:
    if {"prompt_id", "completions", "ref_rewards"} <= columns:
        return "canonical"
    if "responses" in columns:
        return "grouped"
    if "chosen" in columns or "rejected" in columns:
        return "pairs"
    if "completion" in columns:
        return "pointwise"
    raise DataError(
        source,
        None,
        None,
        f"cannot tell the format from columns {sorted(columns)}: expected 'responses' "
        "(grouped), 'chosen'/'rejected' (pairs) or 'completion' (pointwise)",
    )


def content_hash(obj: Any) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class RowReader:
    """Field access for one source row that reports problems with their location."""

    def __init__(self, row: Any, index: int, source: str):
        if not isinstance(row, dict):
            raise DataError(source, index, None, f"expected an object, got {type(row).__name__}")
        self.row, self.index, self.source = row, index, source

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

    def numbers(self, field: str) -> list[float]:
        values = self.row.get(field)
        if values is None:
            return []
        if not isinstance(values, (list, tuple)):
            raise self.error(field, f"expected a list of numbers, got {type(values).__name__}")
        return [self.number(v, f"{field}[{k}]", True) for k, v in enumerate(values)]

    def text(self, value: Any, field: str) -> str:
        """A completion: a string, or a message list whose last message is the answer."""
        if isinstance(value, list):
            if not value or not isinstance(value[-1], dict) or "content" not in value[-1]:
                raise self.error(field, "message list must end with a {'role', 'content'} message")
            value = value[-1]["content"]
        if not isinstance(value, str):
            raise self.error(field, f"expected text, got {type(value).__name__}")
        if not value.strip():
            raise self.error(field, "empty completion")
        return value

    def prompt(self) -> tuple[str, list[dict]]:
        value = self.get("prompt")
        if isinstance(value, str):
            if not value.strip():
                raise self.error("prompt", "empty prompt")
            return value, []
        if isinstance(value, list) and value:
            for k, m in enumerate(value):
                if not (
                    isinstance(m, dict)
                    and isinstance(m.get("role"), str)
                    and isinstance(m.get("content"), str)
                ):
                    raise self.error(f"prompt[{k}]", "expected {'role': str, 'content': str}")
            if not any(m["content"].strip() for m in value):
                raise self.error("prompt", "empty prompt")
            return "", [{"role": m["role"], "content": m["content"]} for m in value]
        raise self.error("prompt", f"expected text or a non-empty message list, got {value!r:.60}")


def to_canonical(row: dict, index: int, fmt: str, source: str, require_rewards: bool) -> dict:
    """One source row in `fmt` -> one canonical row; raises DataError naming the field."""
    r = RowReader(row, index, source)
    prompt, messages = r.prompt()
    prompt_id = str(row.get("prompt_id") or content_hash(messages or prompt))
    ref_rewards = r.numbers("ref_rewards")
    chosen = rejected = -1
    if fmt == "grouped":
        responses = r.get("responses")
        if not isinstance(responses, list) or not responses:
            raise r.error("responses", "expected a non-empty list of {'text', 'reward'}")
        own_refs = "ref_rewards" not in row or row["ref_rewards"] is None
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
        if own_refs:
            ref_rewards = [c["reward"] for c in completions if c["reward"] is not None]
    elif fmt == "pairs":
        completions = []
        for name, score in (("chosen", "score_chosen"), ("rejected", "score_rejected")):
            text = r.text(r.get(name), name)
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
        if completions[0]["text"] == completions[1]["text"]:
            raise r.error("rejected", "identical to 'chosen'")
        chosen, rejected = 0, 1
    elif fmt == "pointwise":
        text = r.text(r.get("completion"), "completion")
        ref_index = row.get("ref_index")
        if ref_index is not None and (
            not isinstance(ref_index, int)
            or ref_index < -1
            or ref_index >= max(len(ref_rewards), 1)
        ):
            raise r.error(
                "ref_index", f"must be -1 or an index into ref_rewards, got {ref_index!r}"
            )
        completions = [
            {
                "completion_id": str(
                    row.get("completion_id") or f"{prompt_id}:{content_hash(text)[:12]}"
                ),
                "text": text,
                "reward": r.number(row.get("reward"), "reward", require_rewards),
                "ref_logp": r.number(row.get("ref_logp"), "ref_logp", False),
                "ref_index": -1 if ref_index is None else ref_index,
            }
        ]
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
    }


def load_canonical(
    cfg: DataConfig, *, require_rewards: bool = False, require_pairs: bool = False
) -> list[dict]:
    """Read, convert and check a data set; every problem names the file, row and field."""
    rows, source = read_rows(cfg.path, cfg.split)
    if cfg.max_rows:
        rows = rows[: cfg.max_rows]
    if not rows:
        raise DataError(source, None, None, "no rows")
    fmt = cfg.format
    if fmt == "auto":
        fmt = detect_format(set(rows[0]) if isinstance(rows[0], dict) else set(), source)
    out = []
    for i, row in enumerate(rows):
        if fmt == "canonical":
            missing = [c for c in CANONICAL_COLUMNS if c not in row]
            if missing:
                raise DataError(source, i, missing[0], "missing")
            out.append(dict(row))
        else:
            out.append(to_canonical(row, i, fmt, source, require_rewards))
    check_rows(out, source, min_ref_rewards=cfg.min_ref_rewards, require_pairs=require_pairs)
    return out


def check_rows(
    rows: list[dict], source: str, *, min_ref_rewards: int = 0, require_pairs: bool = False
) -> None:
    """Checks across rows: reference-reward counts, pairs, and duplicate completion ids."""
    seen: dict[str, int] = {}
    for row in rows:
        i = row["source_row"]
        if len(row["ref_rewards"]) < min_ref_rewards:
            raise DataError(
                source,
                i,
                "ref_rewards",
                f"{len(row['ref_rewards'])} reference rewards, need at least {min_ref_rewards}",
            )
        if require_pairs and row["chosen"] < 0:
            raise DataError(source, i, "chosen", "this algorithm needs chosen/rejected pairs")
        for c in row["completions"]:
            if c["ref_index"] >= len(row["ref_rewards"]):
                raise DataError(source, i, "ref_index", "points past the reference rewards")
            if c["completion_id"] in seen:
                raise DataError(
                    source,
                    i,
                    "completion_id",
                    f"duplicate id '{c['completion_id']}' (first seen in row "
                    f"{seen[c['completion_id']]}): the same prompt and completion twice",
                )
            seen[c["completion_id"]] = i


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path
