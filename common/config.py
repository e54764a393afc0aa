"""One typed configuration system for every script.

A script declares its configuration as a tree of dataclasses whose fields carry a one-line doc
(`doc(default, "...")`). `parse_config` builds it from, in order of precedence:

    dataclass defaults  <  --config FILE.yaml  <  dotted overrides on the command line

    python -m train --config configs/train/qrpo_tiny.yaml optim.lr=3e-4 loss.beta=0.01

OmegaConf's structured configs do the merging and type checking, so an unknown or mistyped key
(in the YAML or on the command line) is an error that names the key; `__post_init__` of each
dataclass adds the checks that types alone cannot express. `--help` lists every dotted key with
its type, default and doc.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")


class ConfigError(ValueError):
    """A configuration that cannot be used, with the key (and file) that is wrong."""


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a default and a one-line description shown by `--help`."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"doc": text}
        )
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata={"doc": text})
    return dataclasses.field(default=default, metadata={"doc": text})


def sub(cls: type, text: str = "") -> Any:
    """A nested config section, built from its own defaults."""
    return dataclasses.field(default_factory=cls, metadata={"doc": text})


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def config_help(cls: type, prefix: str = "") -> list[str]:
    """One line per dotted key: `key: type = default  # doc`."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            text = f.metadata.get("doc", "")
            lines.append(f"[{key}]" + (f"  {text}" if text else ""))
            lines.extend(config_help(tp, prefix=f"{key}."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "(required)"
        lines.append(f"  {key}: {_type_name(tp)} = {default}  # {f.metadata.get('doc', '')}")
    return lines


def _friendly(err: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    where = f"{source}: " if source else ""
    if key:
        return ConfigError(f"{where}config key '{key}': {msg}")
    return ConfigError(f"{where}{msg}")


def build_config(
    cls: type[T], config_file: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Defaults, then the YAML file, then `key.sub=value` overrides; returns a checked `cls`."""
    merged = OmegaConf.structured(cls)
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        except OmegaConfBaseException as err:
            raise _friendly(err, str(path)) from None
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _friendly(err, "command line") from None
    try:
        return OmegaConf.to_object(merged)  # type: ignore[return-value]
    except OmegaConfBaseException as err:
        raise _friendly(err, "") from None


def parse_config(
    cls: type[T], argv: list[str] | None = None, *, prog: str, description: str = ""
) -> T:
    """Command-line entry: `--config FILE` plus dotted overrides; `--help` lists every key."""
    help_text = "\n".join(["configuration keys (override as key.sub=value):", *config_help(cls)])
    parser = argparse.ArgumentParser(
        prog=prog,
        description=description,
        epilog=help_text,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", help="YAML file with any subset of the keys below")
    parser.add_argument("overrides", nargs="*", help="key.sub=value pairs, applied after --config")
    args, unknown = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    try:
        return build_config(cls, args.config, [*args.overrides, *unknown])
    except ConfigError as err:
        parser.exit(2, f"{prog}: error: {err}\n")


def to_yaml(cfg: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Any, run_dir: str | Path, name: str = "config.yaml") -> Path:
    """Write the resolved config into the run directory (the run can be repeated from it)."""
    path = Path(run_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_yaml(cfg))
    return path


def load_saved_config(cls: type[T], run_dir: str | Path, name: str = "config.yaml") -> T:
    return build_config(cls, Path(run_dir) / name)
