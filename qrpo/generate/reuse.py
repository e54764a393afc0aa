"""What decides whether a step's output on disk may be reused: its saved config and a
fingerprint of its input, compared key by key with this run's (qrpo.generate.shards)."""

from __future__ import annotations

import hashlib
import json

from qrpo.common.config import dotted_leaves


def input_fingerprint(units: list[list[dict]]) -> str:
    """A content hash of a shard's input rows: the step before was rerun, or data.path edited,
    when it changes."""
    text = json.dumps(units, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def changed_keys(old: dict, new: dict, keys: tuple[str, ...]) -> list[str]:
    """'key (old -> new)' for each differing key; a key the old file lacks (written before it
    was saved) is not compared."""
    out = []
    for key in keys:
        if key not in old or old[key] == new[key]:
            continue
        if key == "config":
            a, b = dotted_leaves(old[key]), dotted_leaves(new[key])
            out += [
                f"{k} ({_show(a.get(k))} -> {_show(b.get(k))})"
                for k in sorted(a.keys() | b.keys())
                if a.get(k) != b.get(k)
            ]
        elif key == "input":
            out.append("input (the rows this shard reads changed)")
        elif key == "chunks":
            if "input" not in old:  # with an input fingerprint, changed chunks are a changed input
                out.append("chunks (other prompts per chunk)")
        else:
            out.append(f"{key} ({_show(old[key])} -> {_show(new[key])})")
    return out


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 160 else text[:150] + "...(cut)"
