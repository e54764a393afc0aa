"""Tile sizes of the Triton log-prob kernels: a measured table per device capability and dtype.

Choosing a configuration is a dictionary lookup (no autotune on first use, so the first training
step is not slowed and nothing is clobbered by trial launches). The table holds what was measured;
everything else falls back to the generic row, and `use_config` overrides the choice (tests,
benchmarks, sweeps). `python -m kernels.bench` prints the configuration each call used.

Measured rows (source named in each row's `source`):
- sm90 (H100/H200), bf16/fp16 operands, D >= 2048 and V >= 32768: (block_n, block_v, block_d,
  warps, stages) = (128, 256, 64, 8, 3). The sweep at the Llama-3-8B head (N = 16,384, D = 4,096,
  V = 128,256, bf16, H200, torch 2.11, triton 3.6) gave forward 32.1 ms / forward+backward 139 ms
  against 43.7 / 166 ms for the previous default (64, 128, 64, 8, 3); other candidates measured:
  (128, 128, 64, 8, 3) 49.1 / 166; (64, 256, 64, 8, 4) 39.8 / 161; (128, 128, 64, 4, 4)
  45.5 / 168; (128, 64, 64, 4, 3) 61.6 / 180. Shared memory per stage: 128x64 + 64x256 bf16
  = 48 KiB, 3 stages = 144 KiB of the 228 KiB an sm90 SM has.
  The row keeps promote_every = 1 (all BLOCK_D slices chained in the tensor-core accumulator, as
  swept): promoting needs a second 128x256 fp32 accumulator, another 128 registers per thread
  at 8 warps, which would spill. `python -m kernels.bench` times "triton+promote" (the same
  tiles with promote_every = 2) beside it, so one run shows what promotion costs and what error
  it removes.
- Everything else (other GPUs, fp32 operands, small heads): the previous default (64, 128, 64, 8,
  3), a reasonable starting point that was not swept, with promote_every = 2 (its 64x128
  accumulator takes 32 registers per thread at 8 warps, so a second one is affordable).
- The interpreter (TRITON_INTERPRET=1, CPU tests) uses tiny tiles so ragged edges are exercised.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class TritonConfig:
    """Tile sizes and workspace bounds of one launch configuration."""

    block_n: int = 64
    block_v: int = 128
    block_d: int = 64
    num_warps: int = 8
    num_stages: int = 3
    # Promote the tensor-core partial sums to the fp32 tile accumulator every `promote_every`
    # BLOCK_D slices (plain fp32 adds, round-to-nearest), see logprobs_triton's docstring.
    # 1 chains every slice in the tensor-core accumulator (Triton folds `acc + dot` into it).
    promote_every: int = 2
    num_splits: int | None = None  # vocab splits in forward; None = enough programs for the GPU
    # Backward workspace bound: token chunk x vocab slice elements of dlin (input dtype).
    max_workspace_elements: int = 48 * 2**20
    chunk_tokens: int | None = None  # explicit backward token chunk
    vocab_slice: int | None = None  # explicit backward vocab slice
    source: str = "generic default (not swept)"


INTERPRETER_CONFIG = TritonConfig(
    block_n=16,
    block_v=32,
    block_d=16,
    num_warps=1,
    num_stages=1,
    max_workspace_elements=2**16,
    source="interpreter (small tiles)",
)

HOPPER_HALF = TritonConfig(
    block_n=128,
    block_v=256,
    block_d=64,
    num_warps=8,
    num_stages=3,
    promote_every=1,
    source="table: sm90 half, H200 sweep at D=4096 V=128256 (2026-11-29)",
)


@dataclass(frozen=True)
class TableRow:
    min_capability: tuple[int, int]
    max_capability: tuple[int, int]
    dtypes: tuple[torch.dtype, ...]
    min_dim: int
    min_vocab: int
    config: TritonConfig


TABLE: list[TableRow] = [
    TableRow((9, 0), (9, 9), (torch.bfloat16, torch.float16), 2048, 32768, HOPPER_HALF),
]
GENERIC = TritonConfig()

_OVERRIDE: TritonConfig | None = None


def lookup(
    capability: tuple[int, int] | None, dtype: torch.dtype, dim: int, vocab: int
) -> TritonConfig:
    """The first table row that matches, else the generic default."""
    if capability is None:
        return INTERPRETER_CONFIG
    for row in TABLE:
        if (
            row.min_capability <= capability <= row.max_capability
            and dtype in row.dtypes
            and dim >= row.min_dim
            and vocab >= row.min_vocab
        ):
            return row.config
    return GENERIC


def current_config(device: torch.device, dtype: torch.dtype, dim: int, vocab: int) -> TritonConfig:
    """The configuration a launch on `device` with these shapes uses (override first)."""
    if _OVERRIDE is not None:
        return _OVERRIDE
    if device.type != "cuda":
        return INTERPRETER_CONFIG
    return lookup(torch.cuda.get_device_capability(device), dtype, dim, vocab)


@contextlib.contextmanager
def use_config(config: TritonConfig) -> Iterator[None]:
    """Temporarily use these tile sizes (tests, benchmarks, sweeps)."""
    global _OVERRIDE
    previous, _OVERRIDE = _OVERRIDE, config
    try:
        yield
    finally:
        _OVERRIDE = previous


def describe(config: TritonConfig) -> str:
    """One line for logs and the benchmark table."""
    return (
        f"block_n={config.block_n} block_v={config.block_v} block_d={config.block_d} "
        f"warps={config.num_warps} stages={config.num_stages} promote={config.promote_every} "
        f"[{config.source}]"
    )


__all__ = [
    "TritonConfig",
    "INTERPRETER_CONFIG",
    "HOPPER_HALF",
    "GENERIC",
    "current_config",
    "use_config",
    "lookup",
    "describe",
]
