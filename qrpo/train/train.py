"""The training loop: SFT, QRPO and the baselines on packed sequences and the no-logits kernel.

    python -m qrpo.train --config configs/train/qrpo_tiny.yaml                     # one process
    accelerate launch --config_file configs/accelerate/fsdp2_multi_gpu.yaml -m qrpo.train \
        --config configs/train/qrpo_gpu.yaml loss.beta=3e-3                   # one node, N GPUs
    python -m qrpo.slurm.train --config ... nodes=4 gpus_per_node=8                 # SLURM

Read top to bottom: set-up (data first, so bad data fails before a model is loaded), then one
loop whose step packs the global batch's share of this process into micro-batches, computes
per-sequence log-probs, the algorithm's per-example losses, and one optimizer step.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import ExitStack, nullcontext
from dataclasses import asdict
from pathlib import Path

import torch

from qrpo.common.config import ConfigError, to_yaml
from qrpo.common.data import DataError, load_canonical
from qrpo.common.flops import measure_peak_tflops, peak_memory_gb, train_flops_per_token
from qrpo.common.model import ModelConfig, load_model, load_tokenizer
from qrpo.common.model_files import check_model_path
from qrpo.common.packing import Batch, Example, collate, pack
from qrpo.common.run_lock import check_free, hold
from qrpo.common.tokenize import tokenize_rows
from qrpo.common.writable import check_writable
from qrpo.kernels.sequence_model import SequenceLogprobModel, compute_dtype, sequence_logps
from qrpo.train.accelerator import freeze_reference, make_accelerator, make_optimizer
from qrpo.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from qrpo.train.config import TrainConfig
from qrpo.train.examples import build_examples, global_batch_indices, mismatched
from qrpo.train.fingerprint import fingerprints
from qrpo.train.fused import fused_head_applies, fused_head_choice, fused_micro_batch_loss
from qrpo.train.losses import Algorithm, LossInputs, get_algorithm
from qrpo.train.metrics import append_record, flat_config, plot_curves, truncate_log
from qrpo.train.preemption import PreemptionFlag
from qrpo.train.profiling import StepProfiler
from qrpo.train.resume import apply_new_values, describe, plan_resume, record_start, schedule_length


class TrainingError(RuntimeError):
    """The run cannot go on; the message says why and what to change."""


# --------------------------------------------------------------------------- set-up


def load_examples(cfg: TrainConfig, tokenizer=None) -> tuple[list[Example], object]:
    """Data -> checked, tokenized examples. Runs before any model is loaded."""
    spec = get_algorithm(cfg.loss.algorithm)
    cfg.data.min_ref_rewards = max(cfg.data.min_ref_rewards, spec.min_ref_rewards(cfg.loss))
    rows = load_canonical(cfg.data, require_rewards=spec.needs_rewards, require_pairs=spec.pairs)
    tokenizer = tokenizer or load_tokenizer(cfg.model)
    rows, dropped = tokenize_rows(rows, tokenizer, cfg.data, cfg.data.path)
    if dropped:
        print(f"data: dropped {dropped} rows over data.max_length={cfg.data.max_length}")
    return build_examples(rows, cfg), tokenizer


def reference_source(cfg: TrainConfig, examples: list[Example]) -> str:
    """'none', 'data' (precomputed log-probs) or 'model' (a frozen model on the fly)."""
    if not get_algorithm(cfg.loss.algorithm).needs_reference:
        return "none"
    have = [not math.isnan(s.ref_logp) for e in examples for s in e.sequences]
    if cfg.ref.source == "model" or (cfg.ref.source == "auto" and not all(have)):
        return "model"
    if not all(have):
        first = next(i for i, ok in enumerate(have) if not ok)
        raise DataError(
            cfg.data.path,
            None,
            "ref_logp",
            f"ref.source=data but sequence {first} has no precomputed reference log-prob",
        )
    return "data"


def check_precomputed_reference(policy, examples, cfg: TrainConfig, device) -> float:
    """The starting policy must reproduce the precomputed reference log-probs: a wrong reference
    checkpoint silently biases every QRPO target."""
    probe = examples[: cfg.ref.check_rows]
    ours = sequence_logps(policy, probe, cfg.run.micro_batch_tokens, device).cpu()
    theirs = torch.tensor([s.ref_logp for e in probe for s in e.sequences])
    gap = (ours - theirs).abs().max().item()
    if not gap <= cfg.ref.check_tolerance:  # NaN log-probs give a NaN gap: a failure, not a match
        raise TrainingError(
            f"precomputed reference log-probs do not match the starting policy: largest gap "
            f"{gap:.4g} nats over the first {len(probe)} examples (ref.check_tolerance="
            f"{cfg.ref.check_tolerance}). The data's ref_logp must come from exactly "
            f"model.name_or_path={cfg.model.name_or_path} with the same kernel and precision; "
            "recompute them (python -m qrpo.generate.ref_logps) or use ref.source=model."
        )
    return gap


# --------------------------------------------------------------------------- main


def train(cfg: TrainConfig) -> dict:
    # The run_dir lock is held until train returns or raises (ExitStack), not until the process
    # ends: tests and the demo run several trainings in one process.
    with ExitStack() as held:
        return _train(cfg, held)


def _train(cfg: TrainConfig, held: ExitStack) -> dict:
    from accelerate.utils import set_seed
    from transformers import get_scheduler

    # ---- paths and data first: a missing or damaged model, an unwritable run_dir and every
    # data problem are reported before a model is loaded
    check_model_path("model.name_or_path", cfg.model.name_or_path)
    check_model_path("model.tokenizer", cfg.model.tokenizer, weights=False)
    check_model_path("ref.name_or_path", cfg.ref.name_or_path)
    check_writable("run.run_dir", cfg.run.run_dir)
    spec = get_algorithm(cfg.loss.algorithm)
    examples, tokenizer = load_examples(cfg)
    seqs_per_example = spec.sequences_per_example
    per_step = cfg.run.global_batch // seqs_per_example
    if per_step > len(examples):
        raise ConfigError(
            f"run.global_batch={cfg.run.global_batch} sequences is more than the "
            f"{len(examples) * seqs_per_example} in the data"
        )
    ref_source = reference_source(cfg, examples)
    data_fingerprint = fingerprints(examples)

    accelerator = make_accelerator(cfg)
    world, rank, device = accelerator.num_processes, accelerator.process_index, accelerator.device
    log = accelerator.print
    if per_step < world:
        raise ConfigError(
            f"run.global_batch gives {per_step} examples per step, fewer than the {world} processes"
        )
    run_dir = Path(cfg.run.run_dir)
    # One process per run_dir writes checkpoints and logs: the main process (rank 0 under
    # accelerate launch) holds the lock for the run, the others wait for it at the barrier (a
    # refusal ends the launch: torchrun stops the other ranks when one fails). A busy run_dir is
    # reported first; a refused plan (a changed config, resume=never on a used folder) writes
    # nothing, not even the lock file, so the plan is checked once before the lock is taken...
    if accelerator.is_main_process:
        check_free(run_dir, "run.run_dir")
    # Whether this start resumes, and with which config and data: decided before any model loads.
    plan_resume(cfg, data_fingerprint, per_step, log)  # says which checkpoints it skipped
    if accelerator.is_main_process:
        held.enter_context(hold(run_dir, "run.run_dir"))
    accelerator.wait_for_everyone()
    # ... and planned again under the lock, from what an earlier holder may have written since.
    plan = plan_resume(cfg, data_fingerprint, per_step, log=lambda *_: None)  # logged above
    accelerator.wait_for_everyone()  # every process has planned from the old config.yaml
    if accelerator.is_main_process:
        record_start(cfg, plan, log)  # config.yaml, and this start in config_history.yaml
    log(to_yaml(cfg))
    set_seed(cfg.run.seed)

    total_steps = schedule_length(cfg, len(examples), per_step)

    # ---- models
    num_prompts = 1 + max(s.prompt_index for e in examples for s in e.sequences)
    causal_lm = load_model(cfg.model, device, log=log)
    if cfg.run.gradient_checkpointing:
        causal_lm.gradient_checkpointing_enable()
    policy = SequenceLogprobModel(
        causal_lm,
        cfg.loss.kernel_backend,
        num_values=num_prompts if spec.learned_values else 0,
    )
    policy.to(device)
    log(fused_head_choice(cfg, device)[1])
    ref_model = None
    if ref_source == "model":
        ref_cfg = ModelConfig(
            **{**asdict(cfg.model), "name_or_path": cfg.ref.name_or_path or cfg.model.name_or_path}
        )
        ref_model = SequenceLogprobModel(
            load_model(ref_cfg, device, log=log, key="ref.name_or_path"), cfg.loss.kernel_backend
        )
        ref_model = freeze_reference(ref_model.to(device), compute_dtype(cfg.run.mixed_precision))
    elif ref_source == "data":
        with accelerator.autocast():  # the same precision as the loop's own forward
            gap = check_precomputed_reference(policy.eval(), examples, cfg, device)
        log(f"reference: precomputed log-probs match the starting policy (max gap {gap:.2e} nats)")
    prompt_values = None
    if spec.prompt_values is not None:
        prompt_values = _fixed_prompt_values(spec, cfg, examples, ref_model, device, num_prompts)

    groups = [{"params": [p for n, p in policy.named_parameters() if n != "values"]}]
    if policy.values is not None:
        groups.append({"params": [policy.values], "lr": cfg.loss.value_lr, "weight_decay": 0.0})
    optimizer = make_optimizer(groups, cfg, device)
    scheduler = get_scheduler(
        cfg.optim.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.optim.warmup_ratio * total_steps),
        num_training_steps=max(total_steps, 1),
    )
    # The scheduler is not prepared: accelerate would step it once per process per step. It is
    # registered so that save_state/load_state still carry it.
    policy, optimizer = accelerator.prepare(policy, optimizer)
    accelerator.register_for_checkpointing(scheduler)
    if accelerator.is_main_process and cfg.run.trackers:
        accelerator.init_trackers(cfg.run.project, config=flat_config(cfg))

    # ---- resume (qrpo/train/resume.py: run.resume and a changed config)
    step, metrics_log = 0, run_dir / "metrics.jsonl"
    if plan.checkpoint is not None:
        step = load_checkpoint(accelerator, plan.checkpoint)["step"]
        log(f"resumed from {plan.checkpoint} at step {step}")
    if describe(plan):
        log(describe(plan))
    if plan.applies_new_values:
        apply_new_values(cfg, optimizer, scheduler, log)
    if accelerator.is_main_process and (trimmed := truncate_log(metrics_log, step)):
        log(trimmed)

    flops_per_token = train_flops_per_token(causal_lm, with_reference=ref_model is not None)
    peak = cfg.run.peak_tflops or measure_peak_tflops(device, causal_lm.dtype)
    log(
        f"{len(examples)} examples, {per_step} per step, {total_steps} steps, {world} process(es) "
        f"({accelerator.distributed_type.value}); "
        f"reference: {ref_source}; MFU against {peak:.1f} TFLOP/s"
    )

    # ---- loop
    from tqdm import tqdm

    preemption = PreemptionFlag(cfg.run.preempt_signals)
    profiler = StepProfiler(cfg.run.profile_steps, run_dir, rank)
    bar = tqdm(
        total=total_steps,
        initial=step,
        disable=not accelerator.is_main_process,
        desc=cfg.loss.algorithm,
    )
    try:
        while step < total_steps:
            profiler.before_step(step + 1)
            t0 = time.perf_counter()
            policy.train()
            indices = global_batch_indices(len(examples), per_step, step, cfg.run.seed)
            if spec.token_mean:  # e.g. SFT's token-mean NLL over the whole global batch
                denominator = sum(examples[i].sequences[0].num_completion_tokens for i in indices)
            else:  # mean over the global batch's examples
                denominator = len(indices)
            micro_batches = pack(
                [examples[i] for i in indices[rank::world]], cfg.run.micro_batch_tokens
            )
            loss_sum = torch.zeros((), device=device)
            step_metrics: dict[str, list[torch.Tensor]] = {}
            tokens = 0
            for k, group in enumerate(micro_batches):
                batch = collate(group, device)
                tokens += batch.total_tokens
                last = k == len(micro_batches) - 1  # gradients are all-reduced once, here
                with nullcontext() if last else accelerator.no_sync(policy):
                    gen = torch.Generator(device).manual_seed(
                        cfg.run.seed * 7919 + step * 1009 + rank * 101 + k
                    )
                    local, metrics = micro_batch_loss(
                        cfg, accelerator, policy, ref_model, group, batch, prompt_values, gen, step
                    )
                    # DDP averages gradients over processes, hence the factor `world`.
                    accelerator.backward(local * world / denominator)
                loss_sum += local.detach()
                for name, value in metrics.items():
                    step_metrics.setdefault(name, []).append(value.detach().float().reshape(-1))
            loss = accelerator.reduce(loss_sum, reduction="sum") / denominator
            if not torch.isfinite(loss):
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at step {step}: stopped before the update. "
                    f"The last good checkpoint is {latest_checkpoint(run_dir) or 'none (no checkpoint yet)'}; "
                    "lower optim.lr or check the rewards and reference log-probs."
                )
            grad_norm = accelerator.clip_grad_norm_(
                policy.parameters(), cfg.optim.max_grad_norm or math.inf
            )
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            elapsed = time.perf_counter() - t0
            profiler.after_step(step)

            # ---- log
            if step % cfg.run.log_every == 0 or step == total_steps:
                tokens_all = accelerator.reduce(torch.tensor(tokens, device=device), "sum").item()
                record = {
                    "step": step,
                    "loss": loss.item(),
                    "grad_norm": float(grad_norm),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_all / elapsed,
                    "step_s": elapsed,
                    "mfu": tokens_all * flops_per_token / elapsed / (peak * 1e12 * world),
                    "peak_memory_gb": peak_memory_gb(device),
                    **{n: torch.cat(v).nanmean().item() for n, v in step_metrics.items()},
                }
                if accelerator.is_main_process:
                    append_record(metrics_log, json.dumps(record) + "\n")
                    if cfg.run.trackers:
                        accelerator.log(record, step=step)
                    bar.set_postfix(
                        loss=f"{record['loss']:.4g}", tok_s=f"{record['tokens_per_s']:.0f}"
                    )
            bar.update(1)

            # ---- checkpoint; on a preemption signal, all processes agree here, save, and stop
            stop = preemption.agreed(accelerator)
            if (
                stop
                or (cfg.run.save_every and step % cfg.run.save_every == 0)
                or step == total_steps
            ):
                save_checkpoint(
                    accelerator,
                    run_dir,
                    step,
                    data_fingerprint,
                    cfg.run.keep_checkpoints,
                )
            if stop and step < total_steps:
                log(f"preempted: checkpoint at step {step} saved; rerun the same command to resume")
                return {"steps": step, "run_dir": str(run_dir), "preempted": True}
    finally:
        bar.close()
        preemption.restore()
        profiler.stop()

    # ---- end: a plain Hugging Face checkpoint of the policy
    accelerator.wait_for_everyone()
    final_dir = run_dir / "final"
    # The prepared module's state dict (gathered under FSDP), less the wrapper's own parts.
    state = accelerator.get_state_dict(policy)
    state = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    accelerator.unwrap_model(policy).model.save_pretrained(
        final_dir,
        is_main_process=accelerator.is_main_process,
        save_function=accelerator.save,
        state_dict=state,
    )
    if accelerator.is_main_process:
        tokenizer.save_pretrained(final_dir)
        if cfg.run.plot:
            plot_curves(metrics_log, run_dir / "training_curves.png")
        log(f"done: {step} steps; model in {final_dir}; metrics in {metrics_log}")
    if cfg.run.trackers:
        accelerator.end_training()
    return {"steps": step, "run_dir": str(run_dir), "final": str(final_dir), "preempted": False}


def micro_batch_loss(
    cfg,
    accelerator,
    policy,
    ref_model,
    group: list[Example],
    batch: Batch,
    prompt_values,
    generator,
    step: int,
) -> tuple[torch.Tensor, dict]:
    """Forward of one packed micro-batch: the summed per-example loss and its metrics."""
    spec = get_algorithm(cfg.loss.algorithm)
    model = accelerator.unwrap_model(policy)
    if spec.learned_values:  # DRO: V(x), trained with the policy
        values = model.values[batch.prompt_index]
    else:  # fixed per-prompt values (reward partitioning's V_hat), or none
        values = None if prompt_values is None else prompt_values[batch.prompt_index]

    def reference(b: Batch) -> torch.Tensor:
        with torch.no_grad():
            return ref_model(*b.model_inputs()).float()

    def loss_of(logps, ref_logps, kl_logps=None):
        inputs = LossInputs(logps, batch, ref_logps, values, kl_logps, generator)
        return spec.loss(inputs, cfg.loss)

    try:
        if fused_head_applies(cfg, batch.input_ids.device):
            with accelerator.autocast():
                ref_logps = batch.ref_logps if ref_model is None else reference(batch)
                return fused_micro_batch_loss(
                    cfg, policy, batch, lambda lp: loss_of(lp, ref_logps), generator
                )
        with accelerator.autocast():
            logps = policy(*batch.model_inputs())
            ref_logps = batch.ref_logps if ref_model is None else reference(batch)
            kl = None
            if spec.mismatched_kl and ref_model is not None:
                # KTO's reference point: KL estimated on mismatched (prompt, completion) pairs.
                kb = collate(mismatched(group), batch.input_ids.device)
                with torch.no_grad():
                    kl = (policy(*kb.model_inputs()).float(), reference(kb))
            per_example, metrics = loss_of(logps, ref_logps, kl)
        return per_example.sum(), metrics
    except torch.OutOfMemoryError as err:
        raise TrainingError(
            f"out of memory at step {step} on a micro-batch of {batch.total_tokens} tokens: lower "
            f"run.micro_batch_tokens (now {cfg.run.micro_batch_tokens}) or set "
            "run.gradient_checkpointing=true"
        ) from err


def _fixed_prompt_values(
    spec: Algorithm, cfg, examples, ref_model, device, num_prompts
) -> torch.Tensor:
    """Per-prompt values computed once before training from the reference log-probs of every
    training sequence (reward partitioning's V_hat)."""
    if ref_model is not None:
        ref = sequence_logps(ref_model, examples, cfg.run.micro_batch_tokens, device).cpu()
    else:
        ref = torch.tensor([s.ref_logp for e in examples for s in e.sequences])
    seqs = [s for e in examples for s in e.sequences]
    return spec.prompt_values(ref, seqs, num_prompts, cfg.loss).to(device)
