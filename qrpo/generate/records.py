"""The rows the steps pass to each other, and how an input file becomes them.

Every step reads and writes rows of the canonical schema of `qrpo.common.data` (so any merged output
is a file `python -m qrpo.train` reads: it is auto-detected from prompt_id/completions/ref_rewards),
plus `pairs`, all of a prompt's chosen/rejected pairs, and `info`, the input row's other
columns as JSON (unit tests, an entry point, ...: what a reward function may need):

    prompt_id, prompt, messages, source_row
    completions  [{completion_id, text, reward, ref_logp, ref_index}]
    ref_rewards  rewards of the reference samples, in ref_index order
    chosen, rejected   the first pair (indices into completions), -1 when none
    pairs        every pair [[chosen, rejected], ...] of the prompt
    info         JSON object of the input row's columns that no format uses ("{}" if none)

Up to `build`, a row is a *prompt group*: one row per distinct prompt id, holding the data's own
completions (`ref_index` -1) and the reference samples (`ref_index` k). A data set that lists the
same prompt in several rows (a pairs file with several pairs per prompt, a pointwise file) is
grouped first, so each prompt is sampled and scored once. `build` turns groups into training
rows; rows of one prompt always travel together (a *unit*), which is what shards and chunks split.
"""

from __future__ import annotations

import json
from typing import Any

from qrpo.common.data import (
    CANONICAL_COLUMNS,
    COMPLETION_COLUMNS,
    DataConfig,
    DataError,
    RowReader,
    content_hash,
    read_data,
    to_canonical,
)

COMPLETION_KEYS = ("completion_id", "text", "reward", "ref_logp", "ref_index")
COLUMNS = (*CANONICAL_COLUMNS, "pairs", "info")
# Columns the formats read (and `messages`, which pairs data sets often repeat): not info.
_FORMAT_COLUMNS = {
    *COLUMNS,
    *COMPLETION_COLUMNS,
    "reward",
    "ref_logp",
    "ref_index",
    "completion_id",
    "score_chosen",
    "score_rejected",
    "ref_logp_chosen",
    "ref_logp_rejected",
}


def features():
    """Arrow types of a step's rows, fixed so that every chunk file has the same schema."""
    from datasets import Features, List, Value

    return Features(
        {
            "prompt_id": Value("string"),
            "prompt": Value("string"),
            "messages": List({"role": Value("string"), "content": Value("string")}),
            "completions": List(
                {
                    "completion_id": Value("string"),
                    "text": Value("string"),
                    "reward": Value("float64"),
                    "ref_logp": Value("float64"),
                    "ref_index": Value("int64"),
                }
            ),
            "ref_rewards": List(Value("float64")),
            "chosen": Value("int64"),
            "rejected": Value("int64"),
            "source_row": Value("int64"),
            "pairs": List(List(Value("int64"))),
            "info": Value("string"),
        }
    )


def prompt_id_of(prompt: str | list[dict]) -> str:
    """The id qrpo.common.data gives a prompt without one: the same prompt has it in every file."""
    return content_hash(prompt)


def completion(
    completion_id: str,
    text: str,
    reward: float | None = None,
    ref_logp: float | None = None,
    ref_index: int = -1,
) -> dict:
    return {
        "completion_id": completion_id,
        "text": text,
        "reward": reward,
        "ref_logp": ref_logp,
        "ref_index": ref_index,
    }


def prompt_of(row: dict) -> str | list[dict]:
    """The prompt as the data gave it: chat messages, or plain text."""
    return row["messages"] or row["prompt"]


def info_of(row: dict) -> dict:
    """The input row's other columns (see `info`), as a dict."""
    return json.loads(row.get("info") or "{}")


def _info(row: Any) -> str:
    if not isinstance(row, dict):
        return "{}"
    extra = {k: v for k, v in row.items() if k not in _FORMAT_COLUMNS}
    return json.dumps(extra, sort_keys=True, default=str)


# --------------------------------------------------------------------------- reading data files


def _prompt_row(row: Any, index: int, source: str) -> dict:
    """A prompts-only row `{"prompt": ..., "prompt_id"?: ...}` -> a group without completions."""
    r = RowReader(row, index, source)  # the foundation's checks of the prompt, with its messages
    prompt, messages = r.prompt()
    return {
        "prompt_id": str(row.get("prompt_id") or prompt_id_of(messages or prompt)),
        "prompt": prompt,
        "messages": messages,
        "completions": [],
        "ref_rewards": [],
        "chosen": -1,
        "rejected": -1,
        "source_row": index,
    }


def read_data_groups(cfg: DataConfig) -> tuple[list[dict], str]:
    """Any format of qrpo.common.data, or prompts-only rows -> one group per distinct prompt id."""
    # Rows are numbered across the files of a folder: source_row orders the shards.
    rows, _, source, fmt = read_data(cfg, allow_prompts_only=True)
    canonical = []
    for i, row in enumerate(rows):
        if fmt == "prompts":
            canonical.append(_prompt_row(row, i, source))
        elif fmt == "canonical":
            missing = [c for c in CANONICAL_COLUMNS if c not in row]
            if missing:
                raise DataError(source, i, missing[0], "missing")
            canonical.append(dict(row))
        else:
            canonical.append(to_canonical(row, i, fmt, source, require_rewards=False))
        if fmt != "canonical" or "info" not in row:
            canonical[-1]["info"] = _info(row)
    return group_rows(canonical, source), source


def group_rows(rows: list[dict], source: str) -> list[dict]:
    """Occurrences of a prompt -> one group: completions deduplicated by id, every pair kept."""
    groups: dict[str, dict] = {}
    for row in rows:
        pid = row["prompt_id"]
        g = groups.get(pid)
        if g is None:
            g = groups[pid] = {
                "prompt_id": pid,
                "prompt": row["prompt"],
                "messages": row["messages"],
                "completions": [],
                "ref_rewards": list(row["ref_rewards"]),
                "chosen": -1,
                "rejected": -1,
                "source_row": row["source_row"],
                "pairs": [],
                "info": row.get("info") or "{}",
                "_index": {},
            }
        elif row["ref_rewards"] and g["ref_rewards"] and row["ref_rewards"] != g["ref_rewards"]:
            raise DataError(
                source,
                row["source_row"],
                "ref_rewards",
                f"prompt '{pid}' has other reference rewards in row {g['source_row']}",
            )
        elif row["ref_rewards"]:
            g["ref_rewards"] = list(row["ref_rewards"])
        local = []
        for c in row["completions"]:
            cid = c["completion_id"]
            if cid in g["_index"]:
                if g["completions"][g["_index"][cid]]["text"] != c["text"]:
                    raise DataError(
                        source, row["source_row"], "completion_id", f"'{cid}' names two texts"
                    )
            else:
                g["_index"][cid] = len(g["completions"])
                g["completions"].append({k: c.get(k) for k in COMPLETION_KEYS})
            local.append(g["_index"][cid])
        pairs = row.get("pairs") or (
            [[row["chosen"], row["rejected"]]] if row["chosen"] >= 0 else []
        )
        for a, b in pairs:
            pair = [local[a], local[b]]
            if pair not in g["pairs"]:
                g["pairs"].append(pair)
    out = []
    for g in groups.values():
        del g["_index"]
        refs = [c["ref_index"] for c in g["completions"] if c["ref_index"] >= 0]
        if len(refs) != len(set(refs)):
            raise DataError(
                source, g["source_row"], "ref_index", f"prompt '{g['prompt_id']}': ref_index twice"
            )
        if g["pairs"]:
            g["chosen"], g["rejected"] = g["pairs"][0]
        out.append(g)
    return out


# --------------------------------------------------------------------------- units


def units_of(rows: list[dict]) -> list[list[dict]]:
    """Rows grouped by prompt id (a prompt's rows stay together), ordered by first source row,
    which every step keeps: the order, and so the shard of a prompt, is the same in every step."""
    by_id: dict[str, list[dict]] = {}
    for row in rows:
        by_id.setdefault(row["prompt_id"], []).append(row)
    return sorted(by_id.values(), key=lambda unit: min(r["source_row"] for r in unit))


def clean(row: dict) -> dict:
    """Exactly the schema's columns, and completions with exactly their keys (for Arrow)."""
    out = {k: row.get(k) for k in COLUMNS}
    out["completions"] = [{k: c.get(k) for k in COMPLETION_KEYS} for c in row["completions"]]
    out["messages"] = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
    out["pairs"] = [list(p) for p in row.get("pairs") or []]
    out["info"] = row.get("info") or "{}"
    return out
