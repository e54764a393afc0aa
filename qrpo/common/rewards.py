"""Rewards: one registry, one configuration, used by generate's reward step (the reference
rewards that QRPO's quantiles are taken against) and by evaluate (held-out rewards), so both
score a completion the same way.

A reward is one function, registered by name, called once per chunk of prompt rows (generate)
or once per model's held-out samples (evaluate):

    from qrpo.common.rewards import register_reward

    @register_reward("words")
    def words(rows, completions, cfg):
        return [[float(len(c.split())) for c in cs] for cs in completions]

- `rows[i]`: a prompt row as the data gave it: "prompt" (text, or chat messages) and the row's
  other columns (a code problem's tests and entry point, a reference answer, ...);
- `completions[i]`: the completions of rows[i] to score (strings);
- `cfg`: the RewardConfig (a reward model's path, the sandbox's limits, ...).

It returns rewards[i][j], a number per completion, or a `Scores` that also says why each got its
reward (`details`, written next to evaluate's samples) and how many tokens it read (`tokens`,
for generate's throughput). A chunk holds many completions, so a batched scorer (a reward
model, the sandbox's workers) sees them at once.

Built in: `task` (the embedded sorting task, qrpo.common.tiny), `model` (a sequence-classification
reward model, qrpo.common.reward_model) and `code` (the fraction of a problem's asserts passed in the
sandbox, qrpo.common.code_reward). `reward.fn` names a registered reward, or `package.module:name`
for a reward outside the repository: the module is imported when the reward is first used, then
`name` is its function, or a reward it registered under that name.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import ClassVar

from qrpo.common.config import ConfigError, choice, choice_error, doc, sub
from qrpo.common.model import DTYPES
from qrpo.common.sandbox import SandboxConfig

# rewards(rows, completions, cfg) -> rewards[i][j], or Scores
Reward = Callable[[list[dict], list[list[str]], "RewardConfig"], "list[list[float]] | Scores"]
REWARDS: dict[str, Reward] = {}
IMPORT_FORM = "package.module:name"


@dataclass
class Scores:
    """What a reward gives for a chunk; lists are [row][completion]."""

    rewards: list[list[float]]
    details: list[list[dict | None]] | None = None  # why (code: each test's status)
    tokens: int = 0  # tokens read (a reward model): throughput of the reward step


def register_reward(name: str) -> Callable[[Reward], Reward]:
    """Decorator: make `fn(rows, completions, cfg)` available as `reward.fn=name`."""

    def add(fn: Reward) -> Reward:
        REWARDS[name] = fn
        return fn

    return add


@dataclass
class RewardConfig:
    # The evaluate script called this key `kind` (task | model | code): same values.
    RENAMED: ClassVar[dict[str, str]] = {"kind": "fn"}

    fn: str = doc(
        "task",
        "a registered reward: task (the embedded sorting task), model (reward.model), code "
        f"(sandboxed unit tests), one added with register_reward; or '{IMPORT_FORM}'",
    )
    model: str = doc("", "fn=model: sequence-classification reward model, path or hub name")
    label_index: int = doc(0, "fn=model: which output logit is the reward")
    max_length: int = doc(2048, "fn=model: truncate prompt+completion to this many tokens")
    truncation_side: str = choice("right", ("right", "left"), "fn=model: which end to cut")
    batch_size: int = doc(16, "fn=model: sequences per forward")
    dtype: str = choice("float32", tuple(DTYPES), "fn=model: weights dtype")
    trust_remote_code: bool = doc(False, "fn=model: allow the model's own code (e.g. ArmoRM)")
    hub_kernels: bool = doc(
        False,
        "fn=model: let transformers swap in Hugging Face hub kernels at load (model.hub_kernels)",
    )
    device: str = doc(
        "auto", "fn=model: auto (cuda when available; evaluate: its device) | cpu ..."
    )
    sandbox: SandboxConfig = sub(SandboxConfig, "fn=code: limits and isolation of the sandbox")
    keep_existing: bool = doc(
        False, "generate: keep rewards already in the data and score only the missing ones"
    )

    def __post_init__(self):
        if ":" not in self.fn and self.fn not in REWARDS:
            raise _unknown(self.fn)
        if self.fn == "model" and not self.model:
            raise ConfigError("reward.fn=model needs reward.model=PATH")
        if self.label_index < 0 or self.batch_size < 1 or self.max_length < 1:
            raise ConfigError("reward.label_index must be >= 0, batch_size and max_length >= 1")


def _unknown(name: str) -> ConfigError:
    return ConfigError(choice_error("reward.fn", name, [*sorted(REWARDS), IMPORT_FORM]))


def reward_function(name: str) -> Reward:
    """The reward `reward.fn=name` names: registered, or imported from `package.module:name`."""
    if name in REWARDS:
        return REWARDS[name]
    module, sep, attr = name.partition(":")
    if not sep:
        raise _unknown(name)
    try:
        loaded = importlib.import_module(module)
    except ImportError as err:
        raise ConfigError(f"reward.fn={name}: cannot import {module} ({err})") from None
    # The module's own function first: a name it registered may be no attribute of it.
    fn = getattr(loaded, attr, None) or REWARDS.get(attr)
    if not callable(fn):
        raise ConfigError(f"reward.fn={name}: {module} has no reward or function '{attr}'")
    return fn


def compute_rewards(cfg: RewardConfig, rows: list[dict], completions: list[list[str]]) -> Scores:
    """Every completion of every row scored by `cfg.fn`, as Scores (the shape checked: one
    list per row, one reward per completion; what the values are is the caller's to check)."""
    got = reward_function(cfg.fn)(rows, completions, cfg)
    scores = got if isinstance(got, Scores) else Scores(got)
    shape = [len(cs) for cs in completions]
    if [len(rs) for rs in scores.rewards] != shape:
        raise ValueError(
            f"reward {cfg.fn} gave {[len(rs) for rs in scores.rewards]} rewards per row for "
            f"{shape} completions"
        )
    if scores.details is None:
        scores.details = [[None] * n for n in shape]
    return scores


# --------------------------------------------------------------------------- built in


@register_reward("task")
def task_reward(rows: list[dict], completions: list[list[str]], cfg: RewardConfig):
    """The embedded sorting task's graded reward: fraction of answer positions right."""
    from qrpo.common.tiny import TASK

    return [[TASK.reward(r["prompt"], c) for c in cs] for r, cs in zip(rows, completions)]


# One loaded reward model and one probed sandbox per process, reused chunk after chunk.
_LOADED: dict[str, tuple[str, object]] = {}


def _cached(kind: str, key: str, make: Callable[[], object]):
    if kind not in _LOADED or _LOADED[kind][0] != key:
        _LOADED.pop(kind, None)  # free the previous one before loading the next
        _LOADED[kind] = (key, make())
    return _LOADED[kind][1]


def _reward_model(cfg: RewardConfig):
    from qrpo.common.reward_model import RewardModel

    key = repr({k: v for k, v in asdict(cfg).items() if k not in ("sandbox", "keep_existing")})
    return _cached("model", key, lambda: RewardModel(cfg))


def _sandbox(cfg: RewardConfig):
    from qrpo.common.sandbox import Sandbox

    return _cached("sandbox", repr(asdict(cfg.sandbox)), lambda: Sandbox(cfg.sandbox))


@register_reward("model")
def model_reward(rows: list[dict], completions: list[list[str]], cfg: RewardConfig) -> Scores:
    """A sequence-classification reward model's logit `label_index` on the conversation."""
    pairs = [(r["prompt"], c) for r, cs in zip(rows, completions) for c in cs]
    flat, tokens = _reward_model(cfg).score(pairs)
    it = iter(flat)
    return Scores([[next(it) for _ in cs] for cs in completions], tokens=tokens)


@register_reward("code")
def code_reward(rows: list[dict], completions: list[list[str]], cfg: RewardConfig) -> Scores:
    """Fraction of a code problem's asserts passed in the sandbox; details say why."""
    from qrpo.common.code_reward import CodeProblem, score_problems

    problems = [CodeProblem.from_row(r, i) for i, r in enumerate(rows)]
    results = score_problems(_sandbox(cfg), problems, completions)
    return Scores(
        [[r.reward for r in rs] for rs in results],
        details=[[r.to_dict() for r in rs] for rs in results],
    )


_LOADERS = {"model": _reward_model, "code": _sandbox}
BUILT_IN = ("task", "model", "code")


def check_reward(cfg: RewardConfig, row: dict | None = None) -> Reward:
    """The reward `cfg.fn` names, checked before any sampling: it must take (rows, completions,
    cfg), and, given a row, a dry call on it with one empty completion must score it (built-in
    rewards, which need their model or sandbox loaded, skip the dry call)."""
    fn = reward_function(cfg.fn)
    try:
        inspect.signature(fn).bind([], [], cfg)
    except TypeError:
        raise ConfigError(
            f"reward.fn={cfg.fn}: a reward takes (rows, completions, cfg); "
            f"{getattr(fn, '__name__', fn)} takes {inspect.signature(fn)}"
        ) from None
    except ValueError:  # no signature to read (a builtin): the dry call below decides
        pass
    if row is not None and cfg.fn not in BUILT_IN:
        try:
            compute_rewards(cfg, [row], [[""]])
        except Exception as err:  # the user's code: any failure is a failed dry call
            raise ConfigError(
                f"reward.fn={cfg.fn}: a dry call on the first row with an empty completion "
                f"failed before any sampling: {type(err).__name__}: {err}"
            ) from None
    return fn


def load_reward(cfg: RewardConfig, row: dict | None = None) -> Reward:
    """The reward `cfg.fn` names, checked (`check_reward`, a dry call on `row` when given), with
    what a built-in one loads (the reward model, the probed sandbox) loaded now: a wrong path or
    an unusable sandbox stops a run before its first sample is scored, and the first chunk's
    time is scoring alone."""
    fn = check_reward(cfg, row)
    if cfg.fn in _LOADERS:
        _LOADERS[cfg.fn](cfg)
    return fn
