r"""Step 1, `python -m generate.sample`: n completions per prompt from the reference model.

    python -m generate.sample data.path=prompts.jsonl model.name_or_path=REF out=runs/gen \
        sample.n=50 sample.max_new_tokens=2048 shard=0 num_shards=1

Input: any format of common.data, or prompts-only JSONL `{"prompt": text or messages,
"prompt_id"?: ...}`; prompts are rendered with common.tokenize.encode_prompt (the chat template
for message lists). Output rows keep the data's own completions (`ref_index` -1) and append the
samples, `completion_id` `<prompt_id>:ref<k>`, `ref_index` k.

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
import importlib.util
import sys

import torch

from common.tokenize import encode_prompt
from generate.records import completion, prompt_id_of


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
        keys.append(prompt_id_of(p))
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


# --------------------------------------------------------------------------- the step


def _vllm_sampler(cfg, tokenizer):
    """vLLM generation with one seeded SamplingParams per prompt (CUDA; not run in tests)."""
    from vllm import LLM, SamplingParams

    from common.model import resolve

    path = resolve(cfg.model.name_or_path)
    llm = LLM(
        model=path,
        tokenizer=resolve(cfg.model.tokenizer) if cfg.model.tokenizer else path,
        dtype=cfg.model.dtype,
        seed=cfg.sample.seed,
        gpu_memory_utilization=cfg.sample.vllm_memory,
    )
    sc, stops = cfg.sample, stop_ids(tokenizer)

    def run(prompt_ids: list[list[int]], keys: list[str]) -> tuple[list[list[str]], int]:
        params = [
            SamplingParams(
                n=sc.n,
                temperature=sc.temperature,
                top_p=sc.top_p,
                max_tokens=sc.max_new_tokens,
                seed=sample_seed(sc.seed, key, 0) % 2**63,
                stop_token_ids=stops,
                skip_special_tokens=True,
            )
            for key in keys
        ]
        outs = llm.generate(
            [{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False
        )
        texts = [[o.text for o in out.outputs] for out in outs]
        return texts, sum(len(o.token_ids) for out in outs for o in out.outputs)

    return run


def backend(cfg) -> str:
    if cfg.sample.backend != "auto":
        return cfg.sample.backend
    has_vllm = importlib.util.find_spec("vllm") is not None
    return "vllm" if has_vllm and torch.cuda.is_available() else "transformers"


def with_samples(row: dict, texts: list[str]) -> dict:
    """A prompt group with new reference samples: they replace its reference set, and the data's
    own completions (kept first, so pair indices stay valid) are no reference samples."""
    given = [{**c, "ref_index": -1} for c in row["completions"]]
    samples = [
        completion(f"{row['prompt_id']}:ref{k}", text, ref_index=k) for k, text in enumerate(texts)
    ]
    return {**row, "completions": given + samples, "ref_rewards": []}


def make_worker(cfg, source: str):
    """Load the reference model (or vLLM) once; the worker samples one chunk of prompt groups."""
    from common.model import load_model, load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    sc = cfg.sample
    if sc.temperature == 0 and sc.n > 1:
        print(f"warning: sample.temperature=0 is greedy: the {sc.n} samples of a prompt are equal")
    if backend(cfg) == "vllm":
        run = _vllm_sampler(cfg, tokenizer)
    else:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model = load_model(cfg.model, device)

        def run(prompt_ids, keys):
            return generate_samples(
                model,
                tokenizer,
                prompt_ids,
                keys,
                n=sc.n,
                temperature=sc.temperature,
                top_p=sc.top_p,
                max_new_tokens=sc.max_new_tokens,
                seed=sc.seed,
                batch_size=sc.batch_size,
            )

    def work(rows: list[dict]) -> tuple[list[dict], int]:
        if not rows or sc.n == 0:
            return [with_samples(r, []) for r in rows], 0
        ids = [encode_prompt(tokenizer, r["prompt"], r["messages"]) for r in rows]
        texts, tokens = run(ids, [r["prompt_id"] for r in rows])
        return [with_samples(r, ts) for r, ts in zip(rows, texts)], tokens

    return work


def main(argv: list[str] | None = None) -> None:
    from generate.pipeline import cli

    cli("sample", argv, __doc__)


if __name__ == "__main__":
    from generate.pipeline import exit_on_error

    exit_on_error(main, sys.argv[1:])
