"""The reward-model wrapper behind `reward.fn=model`, for generate and evaluate alike.

A sequence-classification model (AutoModelForSequenceClassification) scores the conversation
prompt + completion, rendered in the reward model's own chat template (a text prompt is the
user's message), or the plain concatenation when its tokenizer has no template. One rule for the
score: output logit `label_index` (0 by default: a scalar reward model has one output; ArmoRM-
style models have one per attribute). Sequences are truncated to `max_length` tokens from
`truncation_side` (the paper scores with ArmoRM at 2048) and batched by length, so padding
changes nothing in a score.
"""

from __future__ import annotations

import math

import torch

from qrpo.common.config import ConfigError


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class RewardModel:
    """One float per (prompt, completion); `cfg` is a qrpo.common.rewards.RewardConfig."""

    def __init__(self, cfg):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        from qrpo.common.model import DTYPES, resolve
        from qrpo.common.model_files import check_model_path

        check_model_path("reward.model", cfg.model)
        path = resolve(cfg.model)
        self.cfg, self.device = cfg, _device(cfg.device)
        self.tokenizer = AutoTokenizer.from_pretrained(
            path, trust_remote_code=cfg.trust_remote_code
        )
        self.tokenizer.truncation_side = cfg.truncation_side
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForSequenceClassification.from_pretrained(
            path,
            dtype=DTYPES[cfg.dtype],
            trust_remote_code=cfg.trust_remote_code,
            use_kernels=cfg.hub_kernels,
        )
        labels = self.model.config.num_labels
        if cfg.label_index >= labels:
            raise ConfigError(
                f"reward.label_index={cfg.label_index}: reward model {cfg.model} has {labels} "
                "output(s)"
            )
        # Batched scoring finds each sequence's last token through the pad id.
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model.to(self.device).eval()
        self.templated = bool(getattr(self.tokenizer, "chat_template", None))

    def render(self, prompt, completion: str) -> str:
        """Prompt and completion as one conversation in the reward model's own template."""
        if self.templated:
            messages = prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(
                [*messages, {"role": "assistant", "content": completion}], tokenize=False
            )
        text = prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)
        return text + completion

    def encode(self, text: str) -> list[int]:
        ids = self.tokenizer(
            text,
            add_special_tokens=not self.templated,  # a template writes its own BOS
            truncation=True,
            max_length=self.cfg.max_length,
        )["input_ids"]
        # An empty text would be an empty sequence: score the EOS token instead.
        return ids or [self.tokenizer.eos_token_id]

    @torch.no_grad()
    def score_ids(self, encoded: list[list[int]]) -> list[float]:
        """Logit `label_index` of each token sequence, `batch_size` at a time, shortest first."""
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        scores = [math.nan] * len(encoded)
        for start in range(0, len(order), self.cfg.batch_size):
            idx = order[start : start + self.cfg.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [encoded[i] for i in idx]}, padding=True, return_tensors="pt"
            ).to(self.device)
            logits = self.model(**batch).logits[:, self.cfg.label_index].float().cpu()
            for i, value in zip(idx, logits.tolist()):
                scores[i] = value
        return scores

    def score_texts(self, texts: list[str]) -> list[float]:
        """Scores of already rendered conversations."""
        return self.score_ids([self.encode(t) for t in texts])

    def score(self, pairs: list[tuple[object, str]]) -> tuple[list[float], int]:
        """(scores, tokens read) of (prompt, completion) pairs."""
        encoded = [self.encode(self.render(p, c)) for p, c in pairs]
        return self.score_ids(encoded), sum(len(e) for e in encoded)
