"""Scorers: completions -> rewards, with an optional per-sample explanation.

    task   the embedded sorting task's graded reward (common.tiny.TASK)
    model  a reward model: AutoModelForSequenceClassification with one output, scored on the
           chat-rendered conversation (or prompt + completion for text prompts)
    code   the fraction of a problem's asserts passed in the sandbox (common.code_reward)

A scorer is called as `scorer(rows, completions)` with the held-out rows and completions[i][j]
(sample j of row i), and returns (rewards, details): rewards[i][j] a float, details[i][j] a dict
or None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common.config import ConfigError, choice, doc, sub
from common.sandbox import SandboxConfig

KINDS = ("task", "model", "code")


@dataclass
class RewardConfig:
    kind: str = choice(
        "task", KINDS, "task (embedded sorting task), model (reward model), code (sandbox)"
    )
    model: str = doc("", "kind=model: reward model folder (sequence classifier, one label)")
    batch_size: int = doc(16, "kind=model: sequences per forward")
    max_length: int = doc(2048, "kind=model: longest scored sequence in tokens (truncated beyond)")
    sandbox: SandboxConfig = sub(SandboxConfig, "kind=code: limits and isolation of the sandbox")

    def __post_init__(self):
        if self.kind == "model" and not self.model:
            raise ConfigError("reward.kind=model needs reward.model=PATH")


def _text(prompt) -> str:
    return prompt if isinstance(prompt, str) else prompt[-1]["content"]


class TaskScorer:
    def __call__(self, rows: list[dict], completions: list[list[str]]):
        from common.tiny import TASK

        rewards = [[TASK.reward(r["prompt"], c) for c in cs] for r, cs in zip(rows, completions)]
        return rewards, [[None] * len(cs) for cs in completions]


class RewardModelScorer:
    """Scalar reward of a sequence classifier (num_labels == 1) on the whole conversation."""

    def __init__(self, path: str, device: torch.device, batch_size: int = 16, max_length=2048):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from common.model import resolve

        self.tokenizer = AutoTokenizer.from_pretrained(resolve(path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(resolve(path))
        if self.model.config.num_labels != 1:
            raise ConfigError(
                f"reward model {path} has {self.model.config.num_labels} labels; a scalar reward "
                "model has one (num_labels=1)"
            )
        if self.model.config.pad_token_id is None:  # the classifier reads the last non-pad token
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(device).eval()
        self.device, self.batch_size, self.max_length = device, batch_size, max_length

    def render(self, prompt, completion: str) -> str:
        tok = self.tokenizer
        if isinstance(prompt, list) and getattr(tok, "chat_template", None):
            messages = [*prompt, {"role": "assistant", "content": completion}]
            return tok.apply_chat_template(messages, tokenize=False)
        return _text(prompt) + completion

    @torch.no_grad()
    def score_texts(self, texts: list[str], add_special_tokens: bool = False) -> list[float]:
        # An empty text would be an empty sequence: score the EOS token instead.
        texts = [t or self.tokenizer.eos_token for t in texts]
        out: list[float] = []
        for i in range(0, len(texts), self.batch_size):
            batch = self.tokenizer(
                texts[i : i + self.batch_size],
                padding=True,
                truncation=True,
                max_length=self.max_length,
                add_special_tokens=add_special_tokens,
                return_tensors="pt",
            ).to(self.device)
            out += self.model(**batch).logits[:, 0].float().tolist()
        return out

    def __call__(self, rows: list[dict], completions: list[list[str]]):
        texts = [self.render(r["prompt"], c) for r, cs in zip(rows, completions) for c in cs]
        # A chat template writes its own special tokens; plain text gets the tokenizer's.
        chat = isinstance(rows[0]["prompt"], list) and bool(self.tokenizer.chat_template)
        flat = iter(self.score_texts(texts, add_special_tokens=not chat))
        rewards = [[next(flat) for _ in cs] for cs in completions]
        return rewards, [[None] * len(cs) for cs in completions]


class CodeScorer:
    """Fraction of asserts passed; details say why (status of each test)."""

    def __init__(self, cfg: SandboxConfig):
        from common.sandbox import Sandbox

        self.sandbox = Sandbox(cfg)

    def __call__(self, rows: list[dict], completions: list[list[str]]):
        from common.code_reward import CodeProblem, score

        problems = [CodeProblem.from_row(r, i) for i, r in enumerate(rows)]
        results = score(self.sandbox, problems, completions)
        rewards = [[r.reward for r in rs] for rs in results]
        return rewards, [[r.to_dict() for r in rs] for rs in results]


def make_scorer(cfg: RewardConfig, device: torch.device):
    if cfg.kind == "task":
        return TaskScorer()
    if cfg.kind == "model":
        return RewardModelScorer(cfg.model, device, cfg.batch_size, cfg.max_length)
    return CodeScorer(cfg.sandbox)
