"""Up-front checks of a model path, before anything is loaded: one line naming the config key and
the path or file, instead of a traceback from deep inside transformers or huggingface_hub (a
missing folder otherwise reads "Repo id must be in the form ...", a truncated weights file fails
only once every earlier model has been loaded and used).

    check_model_path("model.name_or_path", "runs/sft/final")
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from qrpo.common.config import ConfigError
from qrpo.common.tiny import TINY_NAME

# What the hub accepts as a repo id: "name" or "owner/name" of word characters, '.', '-'.
_HUB_ID = re.compile(r"^[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)?$")
WEIGHT_SUFFIXES = (".safetensors", ".bin")


class ModelError(ConfigError):
    """A model path that cannot be loaded: missing, not a model folder, or a damaged file."""


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def _looks_local(name: str) -> bool:
    """A path the user meant as a folder here: absolute, relative with ./ or ../ or ~, more than
    one '/', no hub id at all, or whose first part exists here (runs/x where runs/ exists)."""
    if name.startswith(("/", ".", "~")) or name.count("/") > 1 or not _HUB_ID.match(name):
        return True
    return "/" in name and Path(name.split("/")[0]).exists()


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub.constants import HF_HUB_CACHE

    return (Path(HF_HUB_CACHE) / f"models--{repo_id.replace('/', '--')}" / "snapshots").is_dir()


def check_safetensors(path: Path, key: str = "") -> None:
    """The file's header is whole JSON and the file holds every byte its tensors need: a copy cut
    short (a full disk, an interrupted transfer) fails here, naming the file."""
    where = f"{key}: " if key else ""

    def bad(why: str) -> ModelError:
        return ModelError(f"{where}{path}: truncated or corrupt safetensors file ({why})")

    size = path.stat().st_size
    with path.open("rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise bad(f"{size} bytes, shorter than the 8-byte header length")
        n = int.from_bytes(head, "little")
        if n > size - 8:
            raise bad(f"the header says {n} header bytes, the file has {size} bytes")
        try:
            header = json.loads(f.read(n))
            end = max(
                (int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"),
                default=0,
            )
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise bad("its header is not a safetensors header") from None
    if 8 + n + end > size:
        raise bad(f"its tensors need {8 + n + end} bytes, the file has {size}")


def check_model_path(key: str, name_or_path: str, *, weights: bool = True) -> None:
    """`name_or_path` (the value of config key `key`) can be loaded: 'tiny', a hub name (when the
    hub is offline: one in the local cache), or a folder with a readable config.json and whole
    weight files (`weights`: a tokenizer folder needs neither)."""
    if not name_or_path or name_or_path == TINY_NAME:
        return
    path = Path(name_or_path).expanduser()
    if not path.exists():
        if _looks_local(name_or_path):
            raise ModelError(f"{key}: model path does not exist: {name_or_path}")
        if _hub_offline() and not _in_hub_cache(name_or_path):
            raise ModelError(
                f"{key}: '{name_or_path}' is no local folder, and the hub is offline "
                "(HF_HUB_OFFLINE=1) with no cached copy of it"
            )
        return  # a hub name, downloaded (or found in the cache) at load time
    if not path.is_dir():
        raise ModelError(f"{key}: {path} is a file, not a model folder")
    if not weights:
        return
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(f"{key}: {path} is not a model folder: it has no config.json")
    try:
        json.loads(config.read_text())
    except (ValueError, OSError) as err:
        raise ModelError(f"{key}: {config}: unreadable model config ({err})") from None
    files = sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    if not files:
        raise ModelError(f"{key}: {path} has no weights (*.safetensors or pytorch_model*.bin)")
    for index in path.glob("*.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError, AttributeError, OSError):
            raise ModelError(f"{key}: {index}: unreadable weights index") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise ModelError(f"{key}: {index} lists weight files that are missing: {missing}")
    for f in files:
        if f.suffix == ".safetensors":
            check_safetensors(f, key)
