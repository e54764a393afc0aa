"""One configuration tree for every step of the reference-data pipeline.

Every step (`python -m qrpo.generate.sample`, `.reward`, `.build`, `.ref_logps`, `.merge`, and
`python -m qrpo.generate.pipeline`, which runs them in order) takes the same tree, so one YAML file
describes a whole run and each node of a SLURM array runs the same commands with its own shard:

    python -m qrpo.generate.pipeline --config gen.yaml shard=3 num_shards=64
    python -m qrpo.generate.reward --config gen.yaml shard=3 num_shards=64   # one step alone

A step reads the output folder of the step before it in `steps` (`OUT/<that step>`), or
`data.path` when it comes first, and writes `OUT/<step>/shard-*/chunk-*.parquet`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from qrpo.common.config import ConfigError, choice, doc, sub
from qrpo.common.data import DataConfig
from qrpo.common.model import MIXED_PRECISIONS, ModelConfig
from qrpo.common.rewards import RewardConfig
from qrpo.common.sampling import SamplingConfig
from qrpo.kernels.logprobs_api import LOGPROB_BACKENDS

STEPS = ("sample", "reward", "build", "ref_logps", "merge")
REGIMES = ("pointwise", "best_worst", "random_pairs", "offline")
SAMPLE_BACKENDS = ("auto", "transformers", "vllm")


@dataclass
class SampleConfig(SamplingConfig):
    backend: str = choice(
        "auto", SAMPLE_BACKENDS, "sampling engine (auto: vllm when installed and on CUDA)"
    )
    vllm_memory: float = doc(0.85, "vllm: fraction of GPU memory it may take", gt=0, le=1)

    def __post_init__(self):
        if self.n < 0:
            raise ConfigError("sample.n must be >= 0 (0 keeps only the data's own completions)")
        self.check_sampling("sample.")


@dataclass
class BuildConfig:
    regime: str = choice(
        "pointwise",
        REGIMES,
        "pointwise (every reference sample), best_worst (best and worst sample), "
        "random_pairs, offline (the data's own chosen/rejected or completions, scored)",
    )
    pairs_per_prompt: int = doc(1, "random_pairs: disjoint pairs per prompt")
    seed: int = doc(0, "random_pairs: base seed (each prompt id draws its own pairs)")

    def __post_init__(self):
        if self.pairs_per_prompt < 1:
            raise ConfigError("build.pairs_per_prompt must be >= 1")


@dataclass
class RefLogpsConfig:
    micro_batch_tokens: int = doc(4096, "tokens per packed batch (as run.micro_batch_tokens)")
    kernel_backend: str = choice(
        "auto", LOGPROB_BACKENDS, "log-prob kernel, as the training run's loss.kernel_backend"
    )
    mixed_precision: str = choice(
        "no", MIXED_PRECISIONS, "autocast, as the training run's run.mixed_precision"
    )
    device: str = doc("auto", "auto (cuda when available) | cpu | cuda | cuda:1 ...")


@dataclass
class MergeConfig:
    step: str = doc("", "step whose shards to merge (default: the step before merge in steps)")
    output: str = doc("", "merged file, .parquet or .jsonl (default: OUT/<step>.parquet)")
    allow_partial: bool = doc(
        False, "write what is there even when shards, chunks or rows are missing or duplicated"
    )


@dataclass
class PipelineConfig:
    """The whole reference-data pipeline; each step reads the sections it needs."""

    data: DataConfig = sub(
        DataConfig, "input of the first step: any data format, or prompts-only JSONL"
    )
    out: str = doc("runs/generate", "output folder: OUT/<step>/shard-*/chunk-*.parquet")
    steps: list = choice(list(STEPS), STEPS, "steps of the pipeline, in order")
    shard: int = doc(-1, "this shard (-1: $SLURM_ARRAY_TASK_ID - $SLURM_ARRAY_TASK_MIN, or 0)")
    num_shards: int = doc(0, "number of shards (0: $SLURM_ARRAY_TASK_COUNT, or 1)")
    chunk_size: int = doc(64, "prompts per chunk file: the unit of resumption")
    overwrite: bool = doc(
        False,
        "a shard made or started with another config or input: delete and regenerate it "
        "(false: refuse, naming the changed keys; an unchanged shard is always reused)",
    )
    model: ModelConfig = sub(ModelConfig, "the reference model: samples and reference log-probs")
    sample: SampleConfig = sub(SampleConfig, "sampling the reference model")
    reward: RewardConfig = sub(RewardConfig, "scoring completions")
    build: BuildConfig = sub(BuildConfig, "training rows by regime")
    ref_logps: RefLogpsConfig = sub(RefLogpsConfig, "reference log-probs of training completions")
    merge: MergeConfig = sub(MergeConfig, "combining the shards of a step into one file")

    def __post_init__(self):
        if len(set(self.steps)) != len(self.steps):
            raise ConfigError(f"steps must be distinct, got {self.steps}")
        if self.chunk_size < 1:
            raise ConfigError("chunk_size must be >= 1")
        if self.num_shards < 0 or (self.num_shards and self.shard >= self.num_shards):
            raise ConfigError(f"shard={self.shard} must be < num_shards={self.num_shards}")


def step_input(cfg: PipelineConfig, step: str) -> tuple[str, bool]:
    """(path, whether it is a step's output folder): the folder of the step before `step` in
    `cfg.steps`, or data.path for the first step."""
    order = [s for s in cfg.steps if s != "merge"]
    if step in order and order.index(step) > 0:
        return str(Path(cfg.out) / order[order.index(step) - 1]), True
    if not cfg.data.path:
        raise ConfigError(f"step {step} comes first in steps={cfg.steps}: give data.path=FILE")
    return cfg.data.path, False


def fingerprint(cfg: PipelineConfig, step: str) -> dict:
    """What decides a step's output: a resumed shard must have been started with the same."""
    sections = {
        "sample": {"model": cfg.model.name_or_path, "sample": dataclasses.asdict(cfg.sample)},
        "reward": {"reward": dataclasses.asdict(cfg.reward)},
        "build": {"build": dataclasses.asdict(cfg.build)},
        "ref_logps": {
            "model": cfg.model.name_or_path,
            "dtype": cfg.model.dtype,
            "kernel_backend": cfg.ref_logps.kernel_backend,
            "mixed_precision": cfg.ref_logps.mixed_precision,
        },
    }
    out = sections[step]
    # Batch sizes, devices and memory change nothing in the result (seeds are per prompt).
    for section, key in (
        ("sample", "batch_size"),
        ("sample", "vllm_memory"),
        ("reward", "batch_size"),
        ("reward", "device"),
    ):
        out.get(section, {}).pop(key, None)
    return out
