r"""Step 1, `python -m qrpo.generate.sample`: n completions per prompt from the reference model.

    python -m qrpo.generate.sample data.path=prompts.jsonl model.name_or_path=REF out=runs/gen \
        sample.n=50 sample.max_new_tokens=2048 shard=0 num_shards=1

Input: any format of qrpo.common.data, or prompts-only JSONL `{"prompt": text or messages,
"prompt_id"?: ...}`; prompts are rendered with qrpo.common.tokenize.encode_prompt (the chat template
for message lists). Output rows keep the data's own completions (`ref_index` -1) and append the
samples, `completion_id` `<prompt_id>:ref<k>`, `ref_index` k.

Sampling itself (seeded per prompt and sample, whatever the batching) is qrpo/common/sampling.py.
"""

from __future__ import annotations

import importlib.util
import sys

import torch

from qrpo.common.sampling import generate_samples, sample_seed, stop_ids
from qrpo.common.tokenize import encode_prompt
from qrpo.generate.records import completion
from qrpo.generate.runner import cli, exit_on_error, run_shard_step

# --------------------------------------------------------------------------- the step


def _vllm_sampler(cfg, tokenizer):
    """vLLM generation with one seeded SamplingParams per prompt (CUDA; not run in tests)."""
    from vllm import LLM, SamplingParams

    from qrpo.common.model import resolve

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
    from qrpo.common.model import load_model, load_tokenizer

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
            return generate_samples(model, tokenizer, prompt_ids, keys, **sc.draw_options())

    def work(rows: list[dict]) -> tuple[list[dict], int]:
        if not rows or sc.n == 0:
            return [with_samples(r, []) for r in rows], 0
        ids = [encode_prompt(tokenizer, r["prompt"], r["messages"]) for r in rows]
        texts, tokens = run(ids, [r["prompt_id"] for r in rows])
        return [with_samples(r, ts) for r, ts in zip(rows, texts)], tokens

    return work


def main(argv: list[str] | None = None) -> None:
    cli("sample", argv, __doc__, lambda cfg: run_shard_step(cfg, "sample", make_worker))


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
