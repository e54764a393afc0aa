"""Sampling completions from a causal LM with transformers' `generate`, reproducibly.

Each prompt gets its own seed (base seed + prompt position), so a rerun or a different batch
size gives the same samples for the same prompt, whatever else is in the batch.
"""

from __future__ import annotations

import torch

from common.tokenize import encode_prompt


@torch.no_grad()
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
    """n completions per prompt (text without the EOS); prompts are strings or message lists."""
    device = next(model.parameters()).device
    model.eval()
    out: list[list[str]] = []
    for i, prompt in enumerate(prompts):
        messages = prompt if isinstance(prompt, list) else []
        ids = encode_prompt(tokenizer, "" if messages else prompt, messages)
        texts: list[str] = []
        for start in range(0, n, batch_size):
            k = min(batch_size, n - start)
            torch.manual_seed(seed * 1_000_003 + i * 1009 + start)
            gen = model.generate(
                input_ids=torch.tensor([ids] * k, device=device),
                attention_mask=torch.ones(k, len(ids), dtype=torch.long, device=device),
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_p=top_p if temperature > 0 else None,
                top_k=None,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
            texts += tokenizer.batch_decode(gen[:, len(ids) :], skip_special_tokens=True)
        out.append([t.strip() for t in texts])
    return out
