"""Data formats, the canonical schema, and validation before any model is loaded.

Three input formats are recognised from their columns (local JSON/JSONL/Parquet through
`datasets`, or a hub dataset name where a hub is reachable):

- grouped (the reward-partitioning project's format):
  `{"prompt": ..., "responses": [{"text": ..., "reward": ...}, ...]}`. Without a `ref_rewards`
  column the responses are taken to be the reference samples: their rewards become the prompt's
  reference rewards and each response knows its own index among them (`ref_index`).
- pairs (TRL): `{"prompt", "chosen", "rejected"}`, optional `score_chosen`/`score_rejected`;
  strings or chat-message lists (the completion is the last message, the assistant's).
- pointwise: `{"prompt", "completion", "reward"}`, optional `ref_rewards` (K floats),
  `ref_logp`, `ref_index`.

Every format becomes the canonical schema, one row per prompt occurrence (a file in this schema
is read as `canonical` and checked the same way):

    prompt_id    str                  stable id (given, or a hash of the prompt)
    prompt       str                  plain-text prompt ("" when the prompt is chat messages)
    messages     list[{role, content}] chat prompt ([] for plain text)
    completions  list[{completion_id: str, text: str, reward: float|None,
                       ref_logp: float|None, ref_index: int (-1: not a reference sample)}]
    ref_rewards  list[float]          rewards of the reference model's samples for this prompt
    chosen       int                  index into completions of the preferred one, -1 if no pair
    rejected     int                  index of the dispreferred one, -1 if no pair
    source_row   int                  row index in the source file (0-based), for messages
    origin       dict                 file and input field names, for messages (qrpo.common.rows)

What is checked, before any model is loaded (the first problem raises `DataError` naming the
file, the row and the field as the input file spells it):
- every file of a folder on its own (a column whose type differs between files is found in the
  row that has it); a row that is not an object, or not valid JSON;
- prompts: text or a message list, not empty; every message of every message list (prompt,
  chosen, rejected, completion, responses[j].text, messages) an object with a non-empty string
  `role` and a string `content`; a completion's list ends with the assistant's message;
- rewards, scores, reference rewards and `ref_logp`: finite numbers (missing rewards only where
  the algorithm needs none); `ref_index` -1 or an index into the row's reference rewards;
- across rows and files: the fewest reference rewards, pairs where the algorithm needs them, a
  completion id given twice, a prompt id given to two different prompts.
qrpo.common.tokenize then checks what needs the tokenizer: every message role is one the chat
template accepts, and each sequence fits data.max_length.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from qrpo.common.config import ConfigError, choice, doc
from qrpo.common.rows import (  # noqa: F401  (re-exported: the schema's names live here)
    CANONICAL_COLUMNS,
    DataError,
    RowReader,
    content_hash,
    from_canonical,
    to_canonical,
)

FORMATS = ("auto", "grouped", "pairs", "pointwise", "canonical")
TOO_LONG = ("error", "drop")
SUFFIXES = {".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Columns that mark a file as data with completions; a file with none of them is prompts-only.
COMPLETION_COLUMNS = {"responses", "chosen", "rejected", "completion", "completions"}


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


def _data_files(path: Path) -> tuple[list[Path], str]:
    """The files of a file or folder path, and their `datasets` builder (json or parquet)."""
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in SUFFIXES)
    if not files:
        raise DataError(str(path), None, None, "no .json, .jsonl or .parquet files found")
    kinds = {SUFFIXES.get(f.suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise DataError(str(path), None, None, "expected .json/.jsonl or .parquet files, one kind")
    return files, kinds.pop()


def _utf8_text(path: Path) -> str:
    """The file as text; a file that is not UTF-8 (Latin-1, UTF-16, ...) is a DataError naming
    the row (the non-empty line) and the line and column of the first bad byte."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        before = data[: err.start]
        line = before.count(b"\n")
        column = err.start - (before.rfind(b"\n") + 1)
        row = sum(1 for raw in before.split(b"\n")[:-1] if raw.strip())
        json_array = path.suffix == ".json" and data.lstrip().startswith(b"[")
        raise DataError(
            str(path),
            None if json_array else row,
            None,
            f"not UTF-8 text: byte 0x{data[err.start]:02x} on line {line + 1}, column "
            f"{column + 1} (JSON data must be UTF-8; convert it, e.g. iconv -f latin1 -t utf-8)",
        ) from None


def read_json_rows(path: Path) -> list[dict]:
    """Plain-Python reading, used to locate a row that Arrow refused to load."""
    text = _utf8_text(path)
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


def _read_file(path: Path, builder: str) -> list:
    import datasets

    try:
        return list(datasets.load_dataset(builder, data_files=[str(path)], split="train"))
    except Exception as err:
        # Arrow rejects rows whose types change (a reward given as a string, ...). Re-read in
        # Python so validation can name the row and field.
        if builder != "json":
            raise DataError(str(path), None, None, f"could not be loaded: {err}") from None
        return read_json_rows(path)


def read_located_rows(path: str, split: str = "train") -> tuple[list, list[tuple[str, int]], str]:
    """Rows as Python dicts, through `datasets`, each with its (file, row in that file); and the
    name of the whole source. The files of a folder are read one by one, so that a column typed
    differently in one of them is found row by row instead of failing the whole folder."""
    import datasets

    if not path:
        raise ConfigError("data.path is empty: give a JSON/JSONL/Parquet file or a dataset name")
    local = Path(path)
    if not local.exists():
        try:
            rows = list(datasets.load_dataset(path, split=split))
        except Exception as err:  # hub unreachable, unknown name, ...
            raise DataError(path, None, None, f"not a local file and not loadable: {err}") from None
        return rows, [(path, i) for i in range(len(rows))], path
    files, builder = _data_files(local)
    rows, origins = [], []
    for f in files:
        got = _read_file(f, builder)
        rows.extend(got)
        origins.extend((str(f), i) for i in range(len(got)))
    return rows, origins, str(local)


def read_data(
    cfg: DataConfig, *, allow_prompts_only: bool = False
) -> tuple[list, list[tuple[str, int]], str, str]:
    """The rows of cfg.path (at most cfg.max_rows), each with its (file, row in that file), the
    source name, and the format: cfg.format, or the one the first row's columns tell."""
    rows, origins, source = read_located_rows(cfg.path, cfg.split)
    if cfg.max_rows:
        rows, origins = rows[: cfg.max_rows], origins[: cfg.max_rows]
    if not rows:
        raise DataError(source, None, None, "no rows")
    fmt = cfg.format
    if fmt == "auto":
        columns = set(rows[0]) if isinstance(rows[0], dict) else set()
        fmt = detect_format(columns, source, allow_prompts_only=allow_prompts_only)
    return rows, origins, source, fmt


def detect_format(columns: set[str], source: str, *, allow_prompts_only: bool = False) -> str:
    """The format the columns tell; with `allow_prompts_only` (generation's input), a file with
    a prompt and no completion column is "prompts"."""
    if allow_prompts_only and "prompt" in columns and not columns & COMPLETION_COLUMNS:
        return "prompts"
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


# --------------------------------------------------------------------------- checking


def load_canonical(
    cfg: DataConfig, *, require_rewards: bool = False, require_pairs: bool = False
) -> list[dict]:
    """Read, convert and check a data set; every problem names the file, row and field."""
    rows, origins, _, fmt = read_data(cfg)
    out = [
        to_canonical(row, index, fmt, file, require_rewards)
        for row, (file, index) in zip(rows, origins)
    ]
    check_rows(out, min_ref_rewards=cfg.min_ref_rewards, require_pairs=require_pairs)
    return out


def check_rows(rows: list[dict], *, min_ref_rewards: int = 0, require_pairs: bool = False) -> None:
    """Checks across rows (and files): reference-reward counts, pairs, a completion id given
    twice, a prompt id given to two different prompts."""
    seen_ids: dict[str, dict] = {}
    prompts: dict[str, tuple[object, dict]] = {}
    for row in rows:
        origin = row["origin"]

        def error(field: str, problem: str, origin=origin) -> DataError:
            return DataError(origin["file"], origin["row"], field, problem)

        if len(row["ref_rewards"]) < min_ref_rewards:
            raise error(
                origin["ref_rewards"],
                f"{len(row['ref_rewards'])} reference rewards, need at least {min_ref_rewards}",
            )
        if require_pairs and row["chosen"] < 0:
            raise error("chosen", "this algorithm needs chosen/rejected pairs")
        prompt = row["messages"] or row["prompt"]
        first = prompts.setdefault(row["prompt_id"], (prompt, origin))
        if first[0] != prompt:
            raise error(
                "prompt_id",
                f"id '{row['prompt_id']}' is also the id of a different prompt in "
                f"{_where(first[1], origin)}",
            )
        for j, c in enumerate(row["completions"]):
            before = seen_ids.get(c["completion_id"])
            if before is not None:
                raise error(
                    origin["ids"][j],
                    f"duplicate completion id '{c['completion_id']}' (first seen in "
                    f"{_where(before, origin)}): the same prompt and completion twice",
                )
            seen_ids[c["completion_id"]] = origin


def _where(first: dict, now: dict) -> str:
    """'row 3', or 'FILE, row 3' when it is another file."""
    if first["file"] == now["file"]:
        return f"row {first['row']}"
    return f"{first['file']}, row {first['row']}"


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)
    return path
