"""The tile table: which configuration a launch gets, and that overrides win."""

import torch

from qrpo.kernels.tiles import (
    GENERIC,
    HOPPER_HALF,
    INTERPRETER_CONFIG,
    TritonConfig,
    current_config,
    describe,
    lookup,
    use_config,
)


def test_table_rows() -> None:
    bf16, fp32 = torch.bfloat16, torch.float32
    assert lookup((9, 0), bf16, 4096, 128256) is HOPPER_HALF
    assert lookup((9, 0), torch.float16, 3584, 152064) is HOPPER_HALF
    assert (HOPPER_HALF.block_n, HOPPER_HALF.block_v, HOPPER_HALF.block_d) == (128, 256, 64)
    assert lookup((9, 0), fp32, 4096, 128256) is GENERIC  # fp32 operands: not swept
    assert lookup((9, 0), bf16, 512, 128256) is GENERIC  # small head
    assert lookup((8, 0), bf16, 4096, 128256) is GENERIC  # not Hopper
    assert lookup((10, 0), bf16, 4096, 128256) is GENERIC
    assert lookup(None, bf16, 4096, 128256) is INTERPRETER_CONFIG


def test_override_and_description() -> None:
    cpu = torch.device("cpu")
    assert current_config(cpu, torch.float32, 64, 100) is INTERPRETER_CONFIG
    mine = TritonConfig(block_n=32, source="test")
    with use_config(mine):
        assert current_config(cpu, torch.float32, 64, 100) is mine
    assert current_config(cpu, torch.float32, 64, 100) is INTERPRETER_CONFIG
    assert "block_n=128 block_v=256" in describe(HOPPER_HALF) and "sm90" in describe(HOPPER_HALF)
