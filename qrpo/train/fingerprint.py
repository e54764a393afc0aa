"""Content hashes of what the loop trains on, saved with each checkpoint and compared on resume.

The count of examples alone misses reordered rows or changed rewards: the global batch of a step
is a function of (seed, step) over example *indices*, so a resumed run over other data continues
another trajectory without a word. Two hashes, both over the examples after validation and
tokenization (what the loop actually reads), in order:

    data        every field of every sequence: tokens, prompt length and index, reward, reference
                rewards, reference log-prob, reference index, KTO label, QRPO sigma
    reference   the reference part alone (reference rewards and log-probs), so that a message can
                say which of the two changed
"""

from __future__ import annotations

import hashlib
import struct
from array import array

from qrpo.common.packing import Example

SHOWN = 12  # hex digits of a fingerprint in messages


def fingerprints(examples: list[Example]) -> dict:
    data, ref = hashlib.sha256(), hashlib.sha256()
    for e in examples:
        data.update(struct.pack("<q", len(e.sequences)))
        for s in e.sequences:
            ids = array("q", s.input_ids)
            data.update(struct.pack("<qqq", len(ids), s.prompt_len, s.prompt_index))
            data.update(ids.tobytes())
            # Floats by their bytes: NaN (absent) and -0.0 are told apart consistently.
            reference = struct.pack("<dq", s.ref_logp, len(s.ref_rewards))
            reference += array("d", s.ref_rewards).tobytes() + struct.pack("<q", s.ref_index)
            ref.update(reference)
            data.update(reference)
            data.update(struct.pack("<d?d", s.reward, s.desirable, s.sigma))
    return {"examples": len(examples), "data": data.hexdigest(), "reference": ref.hexdigest()}


DATA_KEYS = ("training data", "reference data")


def data_changes(saved: dict, now: dict) -> dict[str, tuple[str, str, str]]:
    """What differs between a checkpoint's fingerprints and this start's: name -> (old, new,
    the sentence that says so). A checkpoint saved before fingerprints existed is compared by its
    count alone."""
    out = {}
    n_old, n_new = saved.get("examples", now["examples"]), now["examples"]
    count = f"{n_old} examples both" if n_old == n_new else f"{n_old} -> {n_new} examples"
    for name, what in (("data", "training data"), ("reference", "reference data")):
        if name in saved and saved[name] != now[name]:
            old, new = saved[name][:SHOWN] + "…", now[name][:SHOWN] + "…"
            line = f"{what} changed since the checkpoint: fingerprint {old} -> {new}, {count}"
            out[what] = (old, new, line)
    if n_old != n_new and not out:
        out["training data"] = (
            n_old,
            n_new,
            f"training data changed since the checkpoint: {count}",
        )
    return out
