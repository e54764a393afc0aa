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


def test_backward_workspace_is_whole_tiles_and_aligned() -> None:
    """The fused pass's vocab slice is whole tiles whatever its chunk's token count, and the
    dlin workspace's rows start 128 bytes apart (cuBLAS needs 16 for half tensor cores)."""
    from qrpo.kernels.logprobs_triton import stored_logits_slice, workspace_stride

    for n in (1, 999, 2000, 2048, 2093, 4001):
        v_slice = stored_logits_slice(HOPPER_HALF, n, 128256)
        assert v_slice % HOPPER_HALF.block_v == 0 and v_slice * n <= 48 * 2**20
    assert stored_logits_slice(HOPPER_HALF, 10, 1000) == 1000  # the whole vocabulary fits
    assert stored_logits_slice(TritonConfig(vocab_slice=999), 10, 128256) == 999  # as asked
    assert [workspace_stride(w) for w in (1, 64, 65, 25165, 128256)] == [64, 64, 128, 25216, 128256]
