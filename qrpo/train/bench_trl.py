"""The TRL side of `python -m qrpo.train.bench`: `trl.DPOTrainer` on the bench's model and pairs.

Written against TRL 1.x (`DPOConfig.max_length` only; `max_prompt_length` is gone). Settings are
TRL's defaults except what the workload fixes: batch, steps, learning rate and its constant
schedule (ours), no gradient checkpointing (TRL's default is on), fp32 on CPU (TRL defaults to
bf16 autocast), no saving or reporting, a log record every step (its `num_tokens`, the sum of
the attention mask, gives the real tokens of each step). The reference model is TRL's default: a
second copy of the model, run on the fly. Imported only when trl is installed.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch


def run_trl(cfg, meta: dict, system: str) -> dict:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from qrpo.common.attention import choose_attention
    from qrpo.train.bench_report import StepClock, throughput
    from qrpo.train.bench_workload import TRL_SYSTEMS

    work, sys_dir = Path(cfg.out) / "work", Path(cfg.out) / "systems" / system
    precomputed = TRL_SYSTEMS[system].get("precompute_ref_log_probs", False)
    cuda = torch.cuda.is_available()
    rows = [json.loads(x) for x in (work / "pairs.jsonl").read_text().splitlines() if x]
    dataset = Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(work / "model")
    attn, _ = choose_attention(cfg.attn_implementation, torch.device("cuda" if cuda else "cpu"))
    if attn in ("torch_varlen", "per_sequence"):
        # TRL pads its batches instead of packing them; on padded rows our two paths are sdpa.
        attn = "sdpa"
    # fp32 weights in both dtypes: bf16 means autocast, as in our loop (mixed_precision=bf16).
    # Hub kernels off, as in our systems (model.hub_kernels=false): both sides run the code we
    # measure, not layers transformers downloads at load. TRL loads its reference model itself,
    # from `model_init_kwargs` (which it ignores, with a warning, for the policy passed in).
    model = AutoModelForCausalLM.from_pretrained(
        work / "model", dtype=torch.float32, attn_implementation=attn, use_kernels=False
    )
    args = DPOConfig(
        output_dir=str(sys_dir / "trl"),
        per_device_train_batch_size=cfg.pairs_per_step,
        gradient_accumulation_steps=1,
        gradient_checkpointing=False,
        max_steps=cfg.total_steps,
        learning_rate=cfg.lr,
        lr_scheduler_type="constant",
        beta=cfg.dpo_beta,
        max_length=cfg.max_length,
        bf16=cfg.dtype == "bfloat16",
        use_cpu=not cuda,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=cfg.seed,
        model_init_kwargs={"use_kernels": False},
        **TRL_SYSTEMS[system],
    )

    class TokenCounter(TrainerCallback):
        """TRL logs `num_tokens` cumulatively (real tokens: the attention mask's sum)."""

        def __init__(self):
            self.cumulative: dict[int, int] = {}

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "num_tokens" in logs:
                self.cumulative[state.global_step] = int(logs["num_tokens"])

    counter = TokenCounter()
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[counter],
    )
    if getattr(trainer.args, "activation_checkpointing", trainer.args.gradient_checkpointing):
        raise RuntimeError("TRL's gradient checkpointing is on: the bench runs it off")
    if (trainer.ref_model is None) != precomputed:
        raise RuntimeError(
            f"{system}: TRL {'built no' if trainer.ref_model is None else 'built a'} reference "
            f"model, but the system assumes {'precomputed' if precomputed else 'on the fly'}"
        )
    with StepClock() as clock:
        trainer.train()
    steps = sorted(counter.cumulative)
    if steps != list(range(1, cfg.total_steps + 1)):
        raise RuntimeError(f"TRL logged num_tokens at steps {steps}, expected every step")
    totals = [0] + [counter.cumulative[s] for s in steps]
    tokens = [b - a for a, b in zip(totals, totals[1:])]
    return {
        "reference": "precomputed" if precomputed else "on the fly",
        "flops_per_token": meta["flops_per_token"]["policy" if precomputed else "with_reference"],
        "trl_attention": attn,
        **throughput(clock.stamps, tokens, cfg.warmup),
    }
