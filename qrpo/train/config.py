"""The training configuration tree (one dataclass per section, a doc per field)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from qrpo.common.config import ConfigError, choice, doc, sub
from qrpo.common.data import DataConfig
from qrpo.common.model import MIXED_PRECISIONS, ModelConfig
from qrpo.kernels.logprobs_api import LOGPROB_BACKENDS
from qrpo.kernels.partition import EMPIRICAL_ESTIMATORS, PARTITIONS
from qrpo.kernels.qrpo import ESTIMATORS, LOSS_TYPES, TRANSFORMS
from qrpo.train.losses import algorithm_names, get_algorithm

REFERENCE_SOURCES = ("auto", "data", "model")
RESUME_MODES = ("auto", "force", "never")


def scheduler_names() -> tuple[str, ...]:
    """transformers.get_scheduler's names (imported only when a config is checked)."""
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType)


@dataclass
class LossConfig:
    algorithm: str = choice(
        "qrpo", algorithm_names, "training algorithm (qrpo/train/losses/: one file per algorithm)"
    )
    beta: float = doc(1e-2, "QRPO/DPO/REBEL/KTO beta (SimPO: its beta)", gt=0)
    length_normalized: bool = doc(
        False, "QRPO: beta_eff = beta/|y| per sample, clamped at max_beta"
    )
    max_beta: float = doc(0.1, "QRPO: clamp of the length-normalised beta", gt=0)
    transform: str = choice("identity", TRANSFORMS, "QRPO f(q), the transform of the quantile")
    estimator: str = choice("inclusive", ESTIMATORS, "QRPO quantile estimator")
    exclude_self: bool = doc(True, "QRPO: leave a completion's own reward out of its reference set")
    loss_type: str = choice("squared", LOSS_TYPES, "QRPO regression loss")
    partition: str = choice(
        "closed_form",
        PARTITIONS,
        "QRPO log Z: closed_form (paper, K -> inf), finite_k (grid j/K), empirical (own refs, "
        "for ties; inclusive|midrank); see docs/partition.md",
    )
    gamma: float = doc(1.0, "SimPO margin gamma (paper: gamma/beta = 0.5)")
    tau: float = doc(1.0, "DRO / reward-partition temperature tau", gt=0)
    kto_threshold: float = doc(
        0.5, "KTO: a completion is desirable when reward >= this (pairs: chosen)"
    )
    kto_desirable_weight: float = doc(1.0, "KTO: weight of desirable examples", ge=0)
    kto_undesirable_weight: float = doc(1.0, "KTO: weight of undesirable examples", ge=0)
    value_lr: float = doc(1e-2, "DRO: learning rate of the per-prompt value table", ge=0)
    kernel_backend: str = choice("auto", LOGPROB_BACKENDS, "log-prob kernel")
    fused_head: Optional[bool] = doc(
        None,
        "fused head+loss pass (qrpo/train/fused.py): true | false | null = the path measured "
        "faster (today: two passes everywhere)",
    )

    def __post_init__(self):
        if not self.beta > 0:  # NaN-safe: NaN <= 0 is False
            raise ConfigError("loss.beta must be > 0")
        if self.partition == "empirical" and self.estimator not in EMPIRICAL_ESTIMATORS:
            raise ConfigError(
                f"loss.partition=empirical needs loss.estimator in {EMPIRICAL_ESTIMATORS}, got "
                f"'{self.estimator}' (the randomized estimator breaks ties: use finite_k)"
            )


@dataclass
class ReferenceConfig:
    source: str = choice(
        "auto",
        REFERENCE_SOURCES,
        "reference log-probs: data (precomputed), model (on the fly), auto (data when complete)",
    )
    name_or_path: str = doc("", "reference model for source=model (default: the policy's start)")
    check_rows: int = doc(
        8, "rows on which precomputed log-probs are checked against the start", ge=1
    )
    check_tolerance: float = doc(1e-2, "largest allowed |precomputed - recomputed| in nats", ge=0)


@dataclass
class OptimConfig:
    lr: float = doc(1e-6, "peak learning rate (AdamW)", gt=0)
    weight_decay: float = doc(0.0, "AdamW weight decay", ge=0)
    betas: list = doc([0.9, 0.999], "AdamW betas", ge=0, lt=1)
    eps: float = doc(1e-8, "AdamW eps", ge=0)
    scheduler: str = choice("cosine", scheduler_names, "transformers get_scheduler name")
    warmup_ratio: float = doc(0.1, "warm-up steps as a fraction of all steps", ge=0, lt=1)
    max_grad_norm: float = doc(
        0.0, "gradient clipping norm (0: no clipping; the norm is logged)", ge=0
    )

    def __post_init__(self):
        if not self.lr > 0:
            raise ConfigError("optim.lr must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ConfigError("optim.warmup_ratio must be in [0, 1)")


@dataclass
class RunConfig:
    run_dir: str = doc("runs/train", "run directory: config, checkpoints, logs, final model")
    seed: int = doc(0, "seed for init-free randomness (data order, randomized quantiles)")
    epochs: int = doc(1, "passes over the data")
    max_steps: int = doc(0, "stop after this many optimizer steps (0: epochs decide)")
    global_batch: int = doc(16, "sequences per optimizer step, over all processes (pairs count 2)")
    micro_batch_tokens: int = doc(4096, "token budget of one packed micro-batch per process")
    mixed_precision: str = choice("no", MIXED_PRECISIONS, "accelerate mixed precision")
    gradient_checkpointing: bool = doc(False, "recompute activations in backward")
    save_every: int = doc(0, "checkpoint every N steps (0: only at the end)")
    keep_checkpoints: int = doc(2, "complete checkpoints kept on disk")
    log_every: int = doc(1, "log metrics every N steps")
    trackers: list = doc(
        ["tensorboard"], "accelerate trackers: tensorboard, wandb, ... ([] for none)"
    )
    project: str = doc("qrpo", "tracker project name")
    peak_tflops: float = doc(0.0, "peak TFLOP/s for MFU (0: measure a matmul at start)", ge=0)
    plot: bool = doc(True, "write training_curves.png at the end")
    preempt_signals: list = doc(
        ["SIGUSR2"], "signals that mean 'checkpoint at the next step and exit with code 75'"
    )
    wandb_name: Optional[str] = doc(None, "run name for wandb")
    resume: str = choice(
        "auto",
        RESUME_MODES,
        "with a checkpoint in run_dir: auto (resume if no key that changes the trajectory "
        "changed, else stop and list them), force (resume with the new values), never "
        "(start fresh; run_dir must be empty)",
    )
    profile_steps: list = doc(
        [], "[first, last] optimizer steps to profile into RUN_DIR/profile_rank*.txt ([]: off)"
    )

    def __post_init__(self):
        if self.global_batch < 1:
            raise ConfigError("run.global_batch must be >= 1")
        if self.profile_steps and (
            len(self.profile_steps) != 2 or not 1 <= self.profile_steps[0] <= self.profile_steps[1]
        ):
            raise ConfigError("run.profile_steps must be [first, last] with 1 <= first <= last")


@dataclass
class TrainConfig:
    """Everything one training run needs; saved as run_dir/config.yaml."""

    model: ModelConfig = sub(ModelConfig, "policy model and tokenizer")
    data: DataConfig = sub(DataConfig, "training data")
    loss: LossConfig = sub(LossConfig, "algorithm and its hyper-parameters")
    ref: ReferenceConfig = sub(ReferenceConfig, "reference log-probs")
    optim: OptimConfig = sub(OptimConfig, "optimizer and schedule")
    run: RunConfig = sub(RunConfig, "run directory, batch, checkpoints, logging")

    def __post_init__(self):
        pairs = get_algorithm(self.loss.algorithm).pairs
        if pairs and self.run.global_batch % 2:
            raise ConfigError(
                "run.global_batch counts sequences: pair algorithms need an even number"
            )
        need = self.data.max_length * (2 if pairs else 1)
        if self.run.micro_batch_tokens < need:
            raise ConfigError(
                f"run.micro_batch_tokens={self.run.micro_batch_tokens} cannot hold one "
                f"example of data.max_length={self.data.max_length} (need >= {need})"
            )
