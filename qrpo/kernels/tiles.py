"""Tile sizes of the log-prob backends: for the Triton kernels a measured table per device
capability and dtype; for the chunked torch backend `ChunkConfig` (at the end).

Choosing a configuration is a dictionary lookup (no autotune on first use, so the first training
step is not slowed and nothing is clobbered by trial launches). The table holds what was measured;
everything else falls back to the generic row, and `use_config` overrides the choice (tests,
benchmarks, sweeps). `python -m qrpo.kernels.bench` prints the configuration each call used.

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
  at 8 warps, which would spill. `python -m qrpo.kernels.bench` times "triton+promote" (the same
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

_OVERRIDE: TritonConfig | None = None  # set by use_config


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


def use_config(config: TritonConfig) -> contextlib.AbstractContextManager[None]:
    """Temporarily use these tile sizes (tests, benchmarks, sweeps)."""
    return _overriding("_OVERRIDE", config)


@contextlib.contextmanager
def _overriding(name: str, config: TritonConfig | ChunkConfig) -> Iterator[None]:
    """Put `config` in this module's global `name` for the duration of a with block."""
    previous = globals()[name]
    globals()[name] = config
    try:
        yield
    finally:
        globals()[name] = previous


def describe(config: TritonConfig) -> str:
    """One line for logs and the benchmark table."""
    return (
        f"block_n={config.block_n} block_v={config.block_v} block_d={config.block_d} "
        f"warps={config.num_warps} stages={config.num_stages} promote={config.promote_every} "
        f"[{config.source}]"
    )


# ---------------------------------------------------------------------------------------------
# The chunked torch backend (qrpo/kernels/logprobs_torch.py)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkConfig:
    """Tile sizes of the chunked torch backend.

    Memory math: the largest temporaries are one [C, V_slice] tile in the accumulation dtype (two
    in backward with softcap, which keeps tanh for the chain rule). With the CPU default (4M
    elements = 16 MiB fp32 per tile) the measured peak extra memory of forward + backward at
    N=4096, V=32000, D=256 fp32 is ~16 MiB, against 524 MB for the full logits. Half-precision
    weights are upcast one vocab slice at a time (torch on CPU has no bf16 matmul with fp32
    output): a slice holds at most `max_weight_slice_elements` fp32 values. On CUDA, where this
    backend is only the fallback, tiles are larger (64M elements = 256 MiB) for GEMM efficiency.
    """

    max_tile_elements: int = 4 * 2**20
    max_weight_slice_elements: int = 4 * 2**20
    chunk_tokens: int | None = None  # explicit token chunk (tests use tiny ones)
    vocab_slice: int | None = None  # explicit vocab slice; by default only half weights are sliced

    def plan(self, num_tokens: int, vocab: int, dim: int, dtype: torch.dtype) -> tuple[int, int]:
        """(token chunk C, vocab slice Vs) for these shapes."""
        if self.vocab_slice is not None:
            v_slice = min(vocab, self.vocab_slice)
        elif dtype in (torch.float32, torch.float64):
            v_slice = vocab  # no upcast needed: one slice, W used in place
        else:
            v_slice = min(vocab, max(1, self.max_weight_slice_elements // max(dim, 1)))
        chunk = self.chunk_tokens or max(1, self.max_tile_elements // v_slice)
        return max(1, min(chunk, max(num_tokens, 1))), max(1, v_slice)


CPU_CHUNKS = ChunkConfig()
CUDA_CHUNKS = ChunkConfig(max_tile_elements=64 * 2**20, max_weight_slice_elements=64 * 2**20)
_CHUNK_OVERRIDE: ChunkConfig | None = None  # set by use_chunk_config


def chunk_config(device: torch.device) -> ChunkConfig:
    """The chunk sizes of the torch backend on `device` (override first)."""
    if _CHUNK_OVERRIDE is not None:
        return _CHUNK_OVERRIDE
    return CUDA_CHUNKS if device.type == "cuda" else CPU_CHUNKS


def use_chunk_config(config: ChunkConfig) -> contextlib.AbstractContextManager[None]:
    """Temporarily replace the chunk sizes (tests use tiny chunks to exercise many of them)."""
    return _overriding("_CHUNK_OVERRIDE", config)


__all__ = [
    "TritonConfig",
    "INTERPRETER_CONFIG",
    "HOPPER_HALF",
    "GENERIC",
    "current_config",
    "use_config",
    "lookup",
    "describe",
    "ChunkConfig",
    "chunk_config",
    "use_chunk_config",
]
