"""Seeded sampling from a causal LM, shared by reference-data generation and evaluation.

Reproducible whatever the batching: sample k of a prompt draws its tokens from its own random
stream, seeded by (sample.seed, prompt id, k), so a rerun, another batch size or another shard
count gives the same samples. transformers' own sampling would draw from one global generator for
the whole batch, so with the transformers backend `generate()` decodes greedily over a logits
processor that does the sampling itself (temperature, top-p, inverse CDF of the row's own uniform
draw) and leaves only the drawn token possible. With vLLM (`sample.backend=vllm`, when
installed) each prompt's SamplingParams carries its own seed: samples differ from the
transformers backend's but are reproducible in the same way.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from qrpo.common.config import ConfigError, doc
from qrpo.common.data import content_hash
from qrpo.common.tokenize import encode_prompt


@dataclass
class SamplingConfig:
    """How completions are drawn: generate's `sample` section and evaluate's top level extend it
    (evaluate with its own defaults for n, max_new_tokens and seed)."""

    n: int = doc(8, "completions per prompt: the K reference samples (paper: 50)")
    temperature: float = doc(1.0, "sampling temperature (0: greedy)", ge=0)
    top_p: float = doc(
        1.0, "nucleus sampling: keep the most likely tokens up to this mass", gt=0, le=1
    )
    max_new_tokens: int = doc(256, "longest completion, in tokens")
    seed: int = doc(0, "base seed; each (prompt id, sample index) draws from its own stream")
    batch_size: int = doc(64, "sequences per generate() call (transformers backend)")

    def draw_options(self) -> dict:
        """These fields as keywords of `generate_samples` and `sample_completions`."""
        return dict(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_new_tokens=self.max_new_tokens,
            seed=self.seed,
            batch_size=self.batch_size,
        )

    def check_sampling(self, prefix: str = "") -> None:
        """The checks every user of these fields needs; `prefix` is the keys' dotted path."""
        if not self.temperature >= 0 or not 0 < self.top_p <= 1:  # NaN fails both
            raise ConfigError(f"{prefix}temperature must be >= 0 and {prefix}top_p in (0, 1]")
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ConfigError(f"{prefix}max_new_tokens and {prefix}batch_size must be >= 1")


def sample_seed(seed: int, key: str, k: int) -> int:
    """The seed of sample k of the prompt with id `key`; independent of everything else."""
    return int(hashlib.sha1(f"{seed}:{key}:{k}".encode()).hexdigest()[:15], 16)


class SeededSampler:
    """A logits processor that samples each row from its own precomputed uniform draws.

    Row r at generation step t takes token `F_r^{-1}(u[r, t])`, where F_r is the CDF of the
    tempered, top-p-truncated next-token distribution over tokens sorted by probability, and
    returns scores that allow only that token (so greedy decoding picks it).
    """

    def __init__(self, uniforms: torch.Tensor, prompt_len: int, temperature: float, top_p: float):
        self.uniforms, self.prompt_len = uniforms, prompt_len
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[1] - self.prompt_len
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        sorted_p, order = probs.sort(dim=-1, descending=True, stable=True)
        if self.top_p < 1:
            # Keep the most likely tokens until their mass reaches top_p (the first always).
            before = sorted_p.cumsum(-1) - sorted_p
            sorted_p = sorted_p * (before < self.top_p)
        cdf = sorted_p.cumsum(-1)
        target = self.uniforms[:, t : t + 1] * cdf[:, -1:]
        pick = torch.searchsorted(cdf, target, right=True).clamp_(max=cdf.shape[-1] - 1)
        token = order.gather(1, pick)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, token, 0.0)


def stop_ids(tokenizer, model=None) -> list[int]:
    """EOS of the tokenizer plus any the model's generation config lists (e.g. end-of-turn)."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(extra if isinstance(extra, list) else [extra])
    return sorted(i for i in ids if i is not None)


@torch.no_grad()
def generate_samples(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    keys: list[str],
    *,
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 256,
    seed: int = 0,
    batch_size: int = 64,
) -> tuple[list[list[str]], int]:
    """n samples per prompt with transformers `generate`, batched across prompts (left padding).

    `keys` (prompt ids) seed each prompt's samples. Returns the texts (special tokens removed)
    and the number of generated tokens (up to and including EOS).
    """
    from transformers import GenerationConfig

    device = next(model.parameters()).device
    model.eval()
    stops = stop_ids(tokenizer, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    jobs = [(i, k) for i in range(len(prompt_ids)) for k in range(n)]
    jobs.sort(key=lambda job: -len(prompt_ids[job[0]]))  # similar lengths share a batch
    texts: list[list[str]] = [[""] * n for _ in prompt_ids]
    tokens = 0
    config = GenerationConfig(
        do_sample=False,  # the sampling happens in SeededSampler
        max_new_tokens=max_new_tokens,
        pad_token_id=pad,
        eos_token_id=stops,
        # Explicit neutral values: the model's own generation defaults must not bend the
        # reference distribution.
        repetition_penalty=1.0,
        no_repeat_ngram_size=0,
        min_new_tokens=0,
        temperature=1.0,
        top_p=1.0,
    )
    for start in range(0, len(jobs), batch_size):
        batch = jobs[start : start + batch_size]
        width = max(len(prompt_ids[i]) for i, _ in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, (i, _) in enumerate(batch):
            p = prompt_ids[i]
            ids[r, width - len(p) :] = torch.tensor(p)
            mask[r, width - len(p) :] = 1
        processors = []
        if temperature > 0:
            uniforms = torch.stack(
                [
                    torch.rand(
                        max_new_tokens,
                        generator=torch.Generator().manual_seed(sample_seed(seed, keys[i], k)),
                        dtype=torch.float64,
                    )
                    for i, k in batch
                ]
            ).to(device)
            processors.append(SeededSampler(uniforms, width, temperature, top_p))
        out = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            generation_config=config,
            logits_processor=processors,
        )
        for r, (i, k) in enumerate(batch):
            new = out[r, width:].tolist()
            end = next((t for t, tok in enumerate(new) if tok in stops), None)
            tokens += len(new) if end is None else end + 1
            texts[i][k] = tokenizer.decode(new[:end], skip_special_tokens=True)
    return texts, tokens


def sample_completions(
    model,
    tokenizer,
    prompts: list,
    *,
    n: int,
    temperature: float = 1.0,
    top_p: float = 1.0,
    max_new_tokens: int = 32,
    seed: int = 0,
    batch_size: int = 64,
) -> list[list[str]]:
    """n completions per prompt (text or message list), stripped; seeded by the prompt itself,
    so every model asked with the same seed draws from the same random streams."""
    ids, keys = [], []
    for p in prompts:
        messages = p if isinstance(p, list) else []
        ids.append(encode_prompt(tokenizer, "" if messages else p, messages))
        keys.append(content_hash(p))  # the id qrpo.common.data gives a prompt without one
    texts, _ = generate_samples(
        model,
        tokenizer,
        ids,
        keys,
        n=n,
        temperature=temperature,
        top_p=top_p,
        max_new_tokens=max_new_tokens,
        seed=seed,
        batch_size=batch_size,
    )
    return [[t.strip() for t in ts] for ts in texts]
