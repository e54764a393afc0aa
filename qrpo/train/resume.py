"""Resuming a run: from which checkpoint, and whether the new configuration may continue it.

A run directory with a complete checkpoint is resumed by rerunning the command. What happens when
the configuration changed in between is `run.resume`:

    auto   resume when no key that changes the training trajectory changed; otherwise stop before
           any model is loaded, listing each such key with its old and new value
    force  resume and apply the new values: optimizer hyper-parameters and learning rates take
           effect from the next step (said in the log and in RUN_DIR/config_history.yaml)
    never  start fresh; the run directory must be empty (the SLURM launcher's qrpo/slurm/ aside)

Keys that change the trajectory: everything except those in `KEEPS_TRAJECTORY` (logging,
trackers, checkpoint cadence, reference-check settings, ...), so a key added to the config later
counts as a change until it is listed here. `run.epochs` and `run.max_steps` set the length of the
learning-rate schedule (the order of the data depends only on the seed and the step): a change is
allowed when the new schedule gives the steps already taken the same learning rates (a constant
schedule, or a cap that does not bind), and counts as a change otherwise (cosine over 6 steps is
not cosine over 3). Other hyper-parameter changes need `force`: optimizer moments, step count and
base learning rates come from the checkpoint, the rest from the new configuration.

The data is compared as the config is: the checkpoint's fingerprints of the examples after the
checks and of the reference data (qrpo/train/fingerprint.py) against this start's; a change stops
`auto` and is applied and recorded by `force`.

Only complete checkpoints are resumed (qrpo/train/checkpoint.py: a manifest of sizes and hashes);
the newest complete one is taken and the newer ones skipped are named in the log. A run directory
whose checkpoints are all incomplete or gone, or one without checkpoint started with another
trajectory, is refused by every mode: starting fresh there would overwrite its config.yaml,
metrics.jsonl and prune what is left of its checkpoints.

Every start appends to RUN_DIR/config_history.yaml (time, mode, step, changed keys old -> new);
RUN_DIR/config.yaml is always the configuration of the latest start.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qrpo.common.config import ConfigError, dotted_leaves, load_saved_config, save_config
from qrpo.common.run_lock import LOCK_NAME
from qrpo.train.checkpoint import Found, find_checkpoint
from qrpo.train.config import TrainConfig
from qrpo.train.examples import steps_per_epoch
from qrpo.train.fingerprint import DATA_KEYS, data_changes
from qrpo.train.metrics import append_record, trim_torn_yaml_list

KEEPS_TRAJECTORY = (
    "run.run_dir",
    "run.resume",
    "run.save_every",
    "run.keep_checkpoints",
    "run.log_every",
    "run.trackers",
    "run.project",
    "run.wandb_name",
    "run.peak_tflops",
    "run.plot",
    "run.preempt_signals",
    "run.gradient_checkpointing",  # recomputes the same activations
    "run.profile_steps",
    "ref.check_rows",
    "ref.check_tolerance",
)
SCHEDULE_LENGTH = ("run.epochs", "run.max_steps")
HISTORY = "config_history.yaml"
LAUNCHER_FOLDER = "slurm"  # written by qrpo.slurm.train before the job starts


@dataclass
class ResumePlan:
    """What this start does: resume from `checkpoint` (None: start fresh) at `step`."""

    mode: str
    checkpoint: Path | None = None
    step: int = 0
    changes: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # every changed key
    trajectory: dict[str, str] = field(default_factory=dict)  # key -> why it changes the run

    @property
    def applies_new_values(self) -> bool:
        return self.checkpoint is not None and bool(self.trajectory)


def schedule_length(cfg: TrainConfig, num_examples: int, per_step: int) -> int:
    """Optimizer steps of the run: epochs over the data, capped by run.max_steps."""
    total = cfg.run.epochs * steps_per_epoch(num_examples, per_step)
    if cfg.run.max_steps:
        total = min(total, cfg.run.max_steps) if cfg.run.epochs else cfg.run.max_steps
    return total


def lr_multipliers(cfg: TrainConfig, total: int, steps: int) -> list[float] | None:
    """The schedule's learning-rate factor for steps 0..steps-1, built as qrpo.train.train builds it
    (None: not a LambdaLR)."""
    import torch
    from torch.optim.lr_scheduler import LambdaLR
    from transformers import get_scheduler

    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    scheduler = get_scheduler(
        cfg.optim.scheduler,
        optimizer,
        num_warmup_steps=int(cfg.optim.warmup_ratio * total),
        num_training_steps=max(total, 1),
    )
    if not isinstance(scheduler, LambdaLR):
        return None
    return [scheduler.lr_lambdas[0](s) for s in range(steps)]


def _leftovers(run_dir: Path) -> list[str]:
    """What a fresh start would mix with: every entry but the launcher's folder and the run
    lock (which this very start holds when it checks again under the lock)."""
    if not run_dir.is_dir():
        return []
    return sorted(p.name for p in run_dir.iterdir() if p.name not in (LAUNCHER_FOLDER, LOCK_NAME))


def check_fresh(run_dir: str | Path) -> None:
    """run.resume=never: refuse a run directory that holds anything of an earlier run."""
    left = _leftovers(Path(run_dir))
    if left:
        shown = ", ".join(left[:6]) + (", ..." if len(left) > 6 else "")
        raise ConfigError(
            f"run.resume=never: run directory {run_dir} is not empty ({shown}); give a new "
            "run.run_dir, empty this one, or use run.resume=auto to continue it"
        )


def _trajectory_changes(
    saved: TrainConfig, cfg: TrainConfig, changes: dict, step: int, num_examples: int, per_step: int
) -> dict[str, str]:
    """The changed keys that make the resumed run differ from the saved one's, and why."""
    out = {k: "" for k in changes if k not in KEEPS_TRAJECTORY and k not in SCHEDULE_LENGTH}
    length_keys = [k for k in SCHEDULE_LENGTH if k in changes]
    if length_keys:
        why = _schedule_change(saved, cfg, step, num_examples, per_step)
        if why is not None:
            out.update({k: why for k in length_keys})
    return out


def _schedule_change(
    saved: TrainConfig, cfg: TrainConfig, step: int, num_examples: int, per_step: int
) -> str | None:
    """Why a new schedule length changes the steps already taken, or None when it does not.
    Both lengths are tried with the new optimizer settings, so that only the length is judged
    here (a changed optim.* key is reported by itself)."""
    old_total = schedule_length(saved, num_examples, per_step)
    new_total = schedule_length(cfg, num_examples, per_step)
    if old_total == new_total:
        return None
    old = lr_multipliers(cfg, old_total, step)
    if old is not None and old == lr_multipliers(cfg, new_total, step):
        return None
    return (
        f" (the {cfg.optim.scheduler} schedule would span {new_total} steps instead of "
        f"{old_total}: the {step} steps done had other learning rates)"
    )


def plan_resume(cfg: TrainConfig, data: dict, per_step: int, log=print) -> ResumePlan:
    """Decide before any model is loaded and before anything is written; raises ConfigError
    when the run must stop (`auto` with changed trajectory keys or data, `never` on a used
    folder, a folder with history but no complete checkpoint). `data`: this start's
    fingerprints (qrpo/train/fingerprint.py)."""
    run_dir, mode = Path(cfg.run.run_dir), cfg.run.resume
    num_examples = data["examples"]
    if mode == "never":
        check_fresh(run_dir)
        return ResumePlan(mode)
    found = find_checkpoint(run_dir)
    if found.skipped:
        log(f"checkpoints skipped (not complete): {found.skipped_line()}")
    if found.checkpoint is None:
        check_history_without_checkpoint(cfg, found, per_step, num_examples)
        return ResumePlan(mode)
    plan = ResumePlan(mode, found.checkpoint, found.step)
    try:
        saved = load_saved_config(TrainConfig, run_dir)
    except ConfigError as err:
        if mode != "force":
            raise ConfigError(
                f"run.resume=auto: {run_dir} has a checkpoint at step {plan.step} but its "
                f"config.yaml cannot be compared with this one ({err}); use run.resume=force to "
                "resume anyway, or a new run.run_dir"
            ) from None
        plan.trajectory["config.yaml"] = " (unreadable)"
        return plan
    old, new = dotted_leaves(saved), dotted_leaves(cfg)
    plan.changes = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    plan.trajectory = _trajectory_changes(
        saved, cfg, plan.changes, plan.step, num_examples, per_step
    )
    for what, (before, after, why) in data_changes(found.trainer, data).items():
        plan.changes[what] = (before, after)
        plan.trajectory[what] = why
    if plan.trajectory and mode == "auto":
        lines = [
            f"  {why}"
            if k in DATA_KEYS
            else f"  {k}: {_show(plan.changes[k][0])} -> {_show(plan.changes[k][1])}{why}"
            for k, why in plan.trajectory.items()
        ]
        raise ConfigError(
            "\n".join(
                [
                    f"run.resume=auto: {run_dir} has a checkpoint at step {plan.step} made with "
                    "other values of keys that change the training trajectory:",
                    *lines,
                    f"Rerun with the saved values ({run_dir / 'config.yaml'}) and data, set "
                    f"run.resume=force to continue from step {plan.step} with the new ones, or "
                    "give a new run.run_dir to start fresh.",
                ]
            )
        )
    return plan


def check_history_without_checkpoint(
    cfg: TrainConfig, found: Found, per_step: int, num_examples: int
) -> None:
    """No complete checkpoint: a fresh start would rewrite config.yaml and metrics.jsonl and
    prune what is left, so it is allowed only over a run that never finished a checkpoint and
    was started with a config whose trajectory is this one's (a job killed before its first save
    and rerun as it was: starting over is what resuming it means)."""
    run_dir, mode = Path(cfg.run.run_dir), cfg.run.resume
    left = _leftovers(run_dir)
    if not left:
        return
    why = ""
    if found.any_folder:
        why = "no complete checkpoint" + (f" ({found.skipped_line()})" if found.skipped else "")
    elif (run_dir / "config.yaml").is_file():
        try:
            saved = load_saved_config(TrainConfig, run_dir)
        except ConfigError:
            why = "an unreadable config.yaml"
        else:
            old, new = dotted_leaves(saved), dotted_leaves(cfg)
            changes = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
            changed = _trajectory_changes(saved, cfg, changes, 0, num_examples, per_step)
            if changed:
                why = "no checkpoint, and a config.yaml with other " + ", ".join(changed)
    if why:
        shown = ", ".join(left[:6]) + (", ..." if len(left) > 6 else "")
        raise ConfigError(
            f"run.resume={mode}: {run_dir} holds an earlier run ({shown}) with {why}; refusing "
            "to start fresh over it: restore a checkpoint, give a new run.run_dir, or empty it"
        )


def _show(value: Any) -> str:
    return repr(value) if isinstance(value, str) else str(value)


def describe(plan: ResumePlan) -> str:
    """What changed since the saved config, for the log ('' when nothing did)."""
    if plan.checkpoint is None:
        return "run.resume=never: starting fresh" if plan.mode == "never" else ""
    parts = []
    if plan.trajectory:
        changed = ", ".join(
            f"{k} {_show(plan.changes[k][0])} -> {_show(plan.changes[k][1])}"
            for k in plan.trajectory
            if k in plan.changes
        )
        parts.append(f"run.resume=force: new values from step {plan.step + 1} on: {changed}")
    kept = [k for k in plan.changes if k not in plan.trajectory]
    if kept:
        parts.append("changed keys that keep the trajectory: " + ", ".join(kept))
    return "; ".join(parts)


def record_start(cfg: TrainConfig, plan: ResumePlan, log=print) -> None:
    """Main process: write RUN_DIR/config.yaml and append this start to config_history.yaml
    (one entry per write, so a kill leaves whole entries; a torn last one is trimmed first)."""
    from omegaconf import OmegaConf

    run_dir = Path(cfg.run.run_dir)
    # Written aside and renamed: a kill mid-write must not leave a config.yaml that the next
    # resume cannot compare with.
    save_config(cfg, run_dir, "config.yaml.tmp").replace(run_dir / "config.yaml")

    def old_new(keys) -> dict:
        return {k: {"old": plan.changes[k][0], "new": plan.changes[k][1]} for k in keys}

    entry = {
        "time": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
        "resume": plan.mode,
        "action": "fresh" if plan.checkpoint is None else f"resumed at step {plan.step}",
        "forced": old_new(k for k in plan.trajectory if k in plan.changes),
        "changed": old_new(k for k in plan.changes if k not in plan.trajectory),
    }
    path = run_dir / HISTORY
    trimmed = trim_torn_yaml_list(path)
    if trimmed:
        log(trimmed)
    append_record(path, OmegaConf.to_yaml([entry]))


def apply_new_values(cfg: TrainConfig, optimizer, scheduler, log) -> None:
    """run.resume=force: the checkpoint restored the old optimizer hyper-parameters and base
    learning rates; set the configuration's, and the learning rate of the next step from the new
    base and the (new) schedule at the restored step."""
    from torch.optim.lr_scheduler import LambdaLR

    bases = [cfg.optim.lr, cfg.loss.value_lr][: len(optimizer.param_groups)]
    for k, (group, base) in enumerate(zip(optimizer.param_groups, bases)):
        group["initial_lr"] = base
        group["betas"] = tuple(cfg.optim.betas)
        group["eps"] = cfg.optim.eps
        group["weight_decay"] = cfg.optim.weight_decay if k == 0 else 0.0
    scheduler.base_lrs = list(bases)
    if isinstance(scheduler, LambdaLR):
        for group, base, fn in zip(optimizer.param_groups, bases, scheduler.lr_lambdas):
            group["lr"] = base * fn(scheduler.last_epoch)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    log(
        f"run.resume=force: step {scheduler.last_epoch + 1} on uses the new optimizer values; "
        f"learning rate of the next step {optimizer.param_groups[0]['lr']:.6g}"
    )
