"""One typed configuration system for every script.

A script declares its configuration as a tree of dataclasses whose fields carry a one-line doc
(`doc(default, "...")`). `parse_config` builds it from, in order of precedence:

    dataclass defaults  <  --config FILE.yaml  <  dotted overrides on the command line

    python -m qrpo.train --config configs/train/qrpo_tiny.yaml optim.lr=3e-4 loss.beta=0.01

OmegaConf's structured configs do the merging and type checking, so an unknown or mistyped key
(in the YAML or on the command line) is an error that names the key. A field with a fixed set of
values is declared with `choice(default, VALUES, "...")`; every such field of the tree is checked
when the config is built, before any `__post_init__` runs, and a wrong value is an error that
names the dotted key, lists the allowed values and suggests the nearest one:

    command line: config key 'loss.transform': 'sqrtt' is not one of identity, log, ...;
    did you mean 'sqrt'?

Every number of the tree (a float field, or a number inside a list or dict) must be finite:
`nan` and `inf` are refused with the dotted key, since a non-finite learning rate or beta
trains an all-NaN model without another error. A field with a natural range declares it,
`doc(1e-6, "...", gt=0)` (gt, ge, lt, le; a list field: each element); the check is written
so that NaN fails it (`not x > 0`, never `x <= 0`, which is False for NaN):

    command line: config key 'optim.lr': must be > 0, got -0.1

A key that was renamed is declared in its class (`RENAMED = {"old": "new"}`), so the old
spelling is an error that names the new key. `__post_init__` of each dataclass adds the checks
that types alone cannot express. `--help` lists every dotted key with its type, default, doc and
allowed values.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import errno
import math
import operator
import sys
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

T = TypeVar("T")
DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


class ConfigError(ValueError):
    """A configuration that cannot be used, with the key (and file) that is wrong."""


# Range bounds a field may declare: name -> (test, sign shown in messages and --help).
BOUNDS = {
    "gt": (operator.gt, ">"),
    "ge": (operator.ge, ">="),
    "lt": (operator.lt, "<"),
    "le": (operator.le, "<="),
}


def doc(default: Any, text: str, **bounds: float) -> Any:
    """A dataclass field with a default and a one-line description shown by `--help`.

    `bounds` (gt, ge, lt, le) declare the field's range, checked by `build_config` (a list
    field: each element), e.g. `doc(1e-6, "peak learning rate", gt=0)`."""
    unknown = set(bounds) - set(BOUNDS)
    if unknown:
        raise TypeError(f"doc(): unknown bounds {sorted(unknown)}; use {list(BOUNDS)}")
    meta = {"doc": text, **({"bounds": bounds} if bounds else {})}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda: default, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def bounds_text(bounds: dict) -> str:
    return " and ".join(f"{BOUNDS[name][1]} {bound}" for name, bound in bounds.items())


def number_error(key: str, value: Any, bounds: dict | None = None) -> str | None:
    """None if `value` is fine for `key`, else what is wrong: a non-finite number, or (when the
    field declares `bounds`) a value that is no number or lies outside them. NaN-safe: each
    bound is tested as `not test(value, bound)`, so NaN never passes."""
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if is_number and not math.isfinite(value):
        return f"config key '{key}': not finite: {value}"
    if not bounds or value is None:
        return None
    if not is_number:
        return f"config key '{key}': not a number: {value!r}"
    if not all(BOUNDS[name][0](value, bound) for name, bound in bounds.items()):
        return f"config key '{key}': must be {bounds_text(bounds)}, got {value}"
    return None


def choice(default: Any, values: Sequence | Callable[[], Sequence], text: str) -> Any:
    """A field whose value must be one of `values` (a tuple, or a function returning one when the
    list is costly to import). Checked by `build_config`; `--help` shows the values. A list-typed
    field is checked element by element. Any dataclass field with `metadata["choices"]` takes
    part, so a module that cannot import this one can declare choices by hand."""
    field = doc(default, text)
    return dataclasses.field(
        default=field.default,
        default_factory=field.default_factory,
        metadata={**field.metadata, "choices": values},
    )


def allowed_values(field: dataclasses.Field) -> tuple | None:
    """The declared choices of a field, or None."""
    values = field.metadata.get("choices")
    if values is None:
        return None
    return tuple(values() if callable(values) else values)


def choice_error(key: str, value: Any, values: Sequence) -> str | None:
    """None if `value` is one of `values`, else what is wrong, naming `key`, with the nearest
    allowed value when one is close."""
    if value in values:
        return None
    text = [str(v) for v in values]
    lowered = {t.lower(): t for t in text}
    near = difflib.get_close_matches(str(value).lower(), list(lowered), n=1, cutoff=0.6)
    if not near:  # a shortening of exactly one value: flash -> flash_attention_2
        near = [t for t in lowered if str(value).lower() in t][:2]
        near = near if len(near) == 1 else []
    hint = f"; did you mean '{lowered[near[0]]}'?" if near else ""
    return f"config key '{key}': {value!r} is not one of {', '.join(text)}{hint}"


def _is_list(value: Any) -> bool:
    return isinstance(value, (list, tuple)) or OmegaConf.is_list(value)


def _numbers(key: str, value: Any) -> list[tuple[str, Any]]:
    """Every scalar under `value` with its dotted key: lists, dicts and nested sections (a list
    of dataclasses, an untyped dict of lists) are searched to the leaves."""
    if _is_list(value):
        return [item for k, v in enumerate(value) for item in _numbers(f"{key}[{k}]", v)]
    if isinstance(value, dict) or OmegaConf.is_dict(value):
        return [item for k, v in value.items() for item in _numbers(f"{key}.{k}", v)]
    if dataclasses.is_dataclass(value):
        return [
            item
            for f in dataclasses.fields(value)
            for item in _numbers(f"{key}.{f.name}", getattr(value, f.name))
        ]
    return [(key, value)]


def _walk_choices(cls: type, node: Any, prefix: str, where: Callable[[str], str]) -> list[str]:
    """Every wrong value in the tree under `node` (a DictConfig or a dataclass instance): a
    value that is not one of its field's choices, a non-finite number anywhere, a number out of
    its field's declared bounds."""
    problems = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        value = getattr(node, f.name)
        if dataclasses.is_dataclass(hints[f.name]):
            problems += _walk_choices(hints[f.name], value, f"{key}.", where)
            continue
        bounds = f.metadata.get("bounds")
        many = _is_list(value)
        items = [(f"{key}[{k}]", v) for k, v in enumerate(value)] if many else [(key, value)]
        found = [number_error(k, v, bounds) for k, v in (items if bounds else _numbers(key, value))]
        values = allowed_values(f)
        if values is not None and value is not None:
            found += [choice_error(k, v, values) for k, v in items]
        problems += [f"{where(key)}: {p}" if where(key) else p for p in found if p]
    return problems


def _raise_choices(problems: list[str]) -> None:
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(
            "\n  ".join([f"{len(problems)} keys have values not allowed:", *problems])
        )


def check_choices(cfg: Any) -> None:
    """Check every `choice` field, every number's finiteness and every declared range of a
    config tree built in Python (build_config does this itself, on the merged YAML and command
    line, before the dataclasses are made)."""
    _raise_choices(_walk_choices(type(cfg), cfg, "", lambda key: ""))


def dotted_leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted key -> value for every leaf of a config tree, a dataclass or a plain dict (a saved
    config read back), at any depth; tuples as lists, so that both kinds compare alike."""
    if dataclasses.is_dataclass(tree):
        items = [(f.name, getattr(tree, f.name)) for f in dataclasses.fields(tree)]
    else:
        items = list(tree.items())
    out = {}
    for name, value in items:
        if dataclasses.is_dataclass(value) or isinstance(value, dict):
            out.update(dotted_leaves(value, f"{prefix}{name}."))
        else:
            out[f"{prefix}{name}"] = list(value) if isinstance(value, tuple) else value
    return out


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
        text = f.metadata.get("doc", "")
        values = allowed_values(f)
        if values is not None:
            text += f" {{{' | '.join(str(v) for v in values)}}}"
        if f.metadata.get("bounds"):
            text += f" ({bounds_text(f.metadata['bounds'])})"
        lines.append(f"  {key}: {_type_name(tp)} = {default}  # {text}")
    return lines


def _renamed_key(cls: type, key: str) -> str | None:
    """The new dotted name of `key` when the config class holding it declares it renamed, in a
    class attribute `RENAMED = {old name: new name}` (not a field: it is no key of the tree)."""
    *path, name = key.split(".")
    for part in path:
        hint = typing.get_type_hints(cls).get(part) if dataclasses.is_dataclass(cls) else None
        if hint is None or not dataclasses.is_dataclass(hint):
            return None
        cls = hint
    new = getattr(cls, "RENAMED", {}).get(name)
    return ".".join([*path, new]) if new else None


def _friendly(err: OmegaConfBaseException, source: str, cls: type | None = None) -> ConfigError:
    key = getattr(err, "full_key", None) or getattr(err, "key", None)
    msg = str(err).splitlines()[0]
    where = f"{source}: " if source else ""
    new = _renamed_key(cls, str(key)) if cls is not None and key else None
    if new:
        return ConfigError(f"{where}config key '{key}' is now '{new}'")
    if key:
        return ConfigError(f"{where}config key '{key}': {msg}")
    return ConfigError(f"{where}{msg}")


def build_config(
    cls: type[T], config_file: str | Path | None = None, overrides: list[str] | None = None
) -> T:
    """Defaults, then the YAML file, then `key.sub=value` overrides; returns a checked `cls`.

    Choices, finiteness and ranges are checked on the merged tree, before any `__post_init__`
    sees a value."""
    merged = OmegaConf.structured(cls)
    from_file = OmegaConf.create()
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"--config: file not found: {path}")
        try:
            from_file = OmegaConf.load(path)
            merged = OmegaConf.merge(merged, from_file)
        except OmegaConfBaseException as err:
            raise _friendly(err, str(path), cls) from None
    from_cli = set()
    for item in overrides or []:
        item = item[2:] if item.startswith("--") else item
        if "=" not in item:
            raise ConfigError(f"override '{item}' must look like key.subkey=value")
        from_cli.add(item.split("=", 1)[0])
        try:
            merged = OmegaConf.merge(merged, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as err:
            raise _friendly(err, "command line", cls) from None

    def where(key: str) -> str:
        # a key set whole (betas.dpo=[...]) or in part (env.X=...) on the command line
        if key in from_cli or any(k.startswith((f"{key}.", f"{key}[")) for k in from_cli):
            return "command line"
        if OmegaConf.select(from_file, key) is not None:
            return str(config_file)
        return ""

    _raise_choices(_walk_choices(cls, merged, "", where))
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


def os_error_message(err: OSError, where: str | Path | None = None) -> str | None:
    """The one-line message of an OSError a command should end with, or None for one it should
    not catch: a full disk or quota, and a read-only or forbidden output path."""
    path = err.filename or where or "?"
    if err.errno in DISK_FULL:
        return f"disk full (no space left on device) while writing {path}"
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write {path}: {err.strerror}"
    return None


def exit_on_error(
    main: Callable[[list[str]], object], argv: list[str], errors: tuple = (ValueError,)
) -> None:
    """Run a command's main; an expected failure (`errors`: ConfigError is a ValueError), a full
    disk or an unwritable output ends with its one-line message and exit code 2, without a
    traceback."""
    try:
        main(argv)
    except errors as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk or a read-only output, named; any other: a traceback
        message = os_error_message(err)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)


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
