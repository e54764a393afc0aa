"""Step 2, `python -m generate.reward`: score every completion, fill each prompt's ref_rewards.

    python -m generate.reward out=runs/gen reward.fn=task                 # the embedded task
    python -m generate.reward out=runs/gen reward.fn=model reward.model=RM reward.max_length=2048
    python -m generate.reward out=runs/gen reward.fn=mypkg.rewards:unit_tests

Rewards come from a reward function, given the prompt as the data gave it (text or chat
messages) and the completion: one of REWARDS (`register_reward` adds one), or any importable
`package.module:function`. A function that takes a third argument `info` also gets the input
row's other columns (`generate.records.info_of`: a code problem's unit tests, an entry point,
...), and one registered with `batched=True` is called once per chunk with every (prompt,
completion, info), so it can run them in parallel: the hook for the evaluate sandbox's code
tests (the paper's code reward is the fraction of unit tests passed). `reward.fn=model` scores
with a sequence-classification reward model through its own tokenizer and chat template,
truncated to `reward.max_length` tokens (the paper scores with ArmoRM at 2048).

The reference rewards of a prompt are the rewards of its reference samples in `ref_index`
order. A NaN, infinite or missing reward stops the step with a DataError naming the source row,
the completion and the reward function: a silent NaN would poison every quantile of its prompt.
"""

from __future__ import annotations

import importlib
import inspect
import math
import sys
from collections.abc import Callable

import torch

from common.data import DataError
from generate.records import info_of, prompt_of
from generate.runner import cli, exit_on_error, run_shard_step

# items: (prompt, completion, info) per completion -> one reward each
Scorer = Callable[[list[tuple[object, str, dict]]], list[float]]
REWARDS: dict[str, tuple[Callable, bool]] = {}


def register_reward(name: str, *, batched: bool = False) -> Callable[[Callable], Callable]:
    """Decorator: make a reward function available as `reward.fn=name`.

    Per completion: `fn(prompt, completion) -> float`, or `fn(prompt, completion, info)`.
    With `batched=True`: `fn([(prompt, completion, info), ...]) -> [float, ...]` per chunk.
    """

    def add(fn: Callable) -> Callable:
        REWARDS[name] = (fn, batched)
        return fn

    return add


@register_reward("task")
def task_reward(prompt, completion: str) -> float:
    """The embedded sorting task's graded reward (common.tiny)."""
    from common.tiny import TASK

    return TASK.reward(prompt, completion)


def _takes_info(fn: Callable) -> bool:
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return "info" in params or len(params) >= 3


def reward_function(name: str) -> Scorer:
    """A registered reward, or `package.module:function` (its attribute `batched`, if any, says
    whether it takes a whole chunk), as a scorer of (prompt, completion, info) items."""
    if name in REWARDS:
        fn, batched = REWARDS[name]
    elif ":" in name:
        module, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module), attr)
        except (ImportError, AttributeError) as err:
            raise ValueError(f"reward.fn={name}: cannot import it ({err})") from None
        batched = bool(getattr(fn, "batched", False))
    else:
        raise ValueError(
            f"reward.fn={name}: not a registered reward ({sorted(REWARDS)}), not 'model', and "
            "not 'package.module:function'"
        )
    if batched:
        return fn
    if _takes_info(fn):
        return lambda items: [fn(p, c, info) for p, c, info in items]
    return lambda items: [fn(p, c) for p, c, _ in items]


class RewardModel:
    """A sequence-classification reward model with its own tokenizer, chat template and
    truncation; one float per (prompt, completion), batched by length."""

    def __init__(self, cfg, device: torch.device | str = "cpu"):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from common.model import DTYPES, resolve

        path = resolve(cfg.model)
        self.cfg, self.device = cfg, torch.device(device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code
        )
        self.tokenizer.truncation_side = cfg.truncation_side
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path, dtype=DTYPES[cfg.dtype], trust_remote_code=cfg.trust_remote_code
        )
        # Batched scoring finds each sequence's last token through the pad id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()

    def render(self, prompt, completion: str) -> str:
        """Prompt and completion as one conversation in the reward model's own template."""
        if getattr(self.tokenizer, "chat_template", None):
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": completion}], tokenize=False
            )
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return text + completion

    @torch.no_grad()
    def __call__(self, items: list[tuple[object, str, dict]]) -> tuple[list[float], int]:
        templated = bool(getattr(self.tokenizer, "chat_template", None))
        encoded = [
            self.tokenizer(
                self.render(p, c),
                add_special_tokens=not templated,  # a template writes its own BOS
                truncation=True,
                max_length=self.cfg.max_length,
            )["input_ids"]
            for p, c, _ in items
        ]
        order = sorted(range(len(items)), key=lambda i: len(encoded[i]))
        scores = [math.nan] * len(items)
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**batch).logits[:, self.cfg.label_index].float().cpu()
            for i, value in zip(idx, logits.tolist()):
                scores[i] = value
        return scores, sum(len(e) for e in encoded)


def _checked(value, source: str, row: dict, j: int, fn: str) -> float:
    c = row["completions"][j]
    where = f"completion '{c['completion_id']}' of prompt '{row['prompt_id']}'"
    if value is None:
        raise DataError(
            source, row["source_row"], f"completions[{j}].reward", f"reward {fn} gave none: {where}"
        )
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DataError(
            source,
            row["source_row"],
            f"completions[{j}].reward",
            f"reward {fn} gave {value!r}, not a number: {where}",
        )
    if not math.isfinite(value):
        raise DataError(
            source,
            row["source_row"],
            f"completions[{j}].reward",
            f"reward {fn} gave a non-finite value {value}: {where}",
        )
    return float(value)


def reference_rewards(row: dict, source: str) -> list[float]:
    """Rewards of the reference samples in ref_index order; samples the data no longer holds
    keep the reward the data gave for them."""
    refs = {c["ref_index"]: c["reward"] for c in row["completions"] if c["ref_index"] >= 0}
    old = list(row["ref_rewards"])
    size = max([len(old), *[k + 1 for k in refs]])
    out = []
    for k in range(size):
        value = refs.get(k, old[k] if k < len(old) else None)
        if value is None:
            raise DataError(
                source, row["source_row"], "ref_rewards", f"no reward for reference sample {k}"
            )
        out.append(value)
    return out


def score_rows(
    rows: list[dict], scorer, source: str, fn: str, keep_existing: bool = False
) -> tuple[list[dict], int]:
    """Rows with every completion scored and ref_rewards filled; `scorer` maps a list of
    (prompt, completion, info) to (rewards, tokens)."""
    todo = [
        (i, j)
        for i, row in enumerate(rows)
        for j, c in enumerate(row["completions"])
        if not (keep_existing and c["reward"] is not None)
    ]
    infos = [info_of(row) for row in rows]
    values, tokens = scorer(
        [(prompt_of(rows[i]), rows[i]["completions"][j]["text"], infos[i]) for i, j in todo]
    )
    if len(values) != len(todo):
        raise ValueError(f"reward {fn} gave {len(values)} rewards for {len(todo)} completions")
    out = [{**row, "completions": [dict(c) for c in row["completions"]]} for row in rows]
    for (i, j), value in zip(todo, values):
        out[i]["completions"][j]["reward"] = _checked(value, source, out[i], j, fn)
    for row in out:
        for j, c in enumerate(row["completions"]):
            _checked(c["reward"], source, row, j, fn)  # kept rewards are checked too
        row["ref_rewards"] = reference_rewards(row, source)
    return out, tokens


def make_worker(cfg, source: str):
    """The scorer (a reward model is loaded once) and the worker for one chunk of groups."""
    rc = cfg.reward
    if rc.fn == "model":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        scorer = RewardModel(rc, device)
        name = f"model {rc.model}"
    else:
        rewards = reward_function(rc.fn)
        name = rc.fn

        def scorer(items):
            return list(rewards(items)), 0

    def work(rows: list[dict]) -> tuple[list[dict], int]:
        return score_rows(rows, scorer, source, name, rc.keep_existing)

    return work


def main(argv: list[str] | None = None) -> None:
    cli("reward", argv, __doc__, lambda cfg: run_shard_step(cfg, "reward", make_worker))


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
