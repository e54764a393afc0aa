"""The Accelerator of a run, FSDP2 included on CPU, and the optimizer that suits the device.

accelerate maps an FSDP config on CPU-only machines to plain DDP (MULTI_CPU): its FSDP branch is
reserved for accelerators. `torch.distributed.fsdp.fully_shard` itself works over gloo, so on CPU
we keep what the config asked for and promote the state to FSDP2. The CPU test of FSDP2
(tests/train/test_fsdp.py) then runs the same sharding, gathering and sharded checkpoints as a
GPU node does.
"""

from __future__ import annotations

import os

import torch


def make_accelerator(cfg):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    # One process may run several trainings (the demo, tests): accelerate keeps a singleton
    # state that would pin the first run's mixed precision; the process group is kept.
    AcceleratorState._reset_state()
    cpu = not torch.cuda.is_available()
    fsdp_on_cpu = cpu and os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    # cpu=True on machines without CUDA: several processes then form a gloo group (MULTI_CPU).
    accelerator = Accelerator(
        cpu=cpu,
        mixed_precision=cfg.run.mixed_precision,
        log_with=list(cfg.run.trackers) or None,
        project_dir=cfg.run.run_dir,
    )
    if fsdp_on_cpu and accelerator.num_processes > 1:
        plugin = FullyShardedDataParallelPlugin()  # reads the launcher's FSDP_* variables
        if plugin.fsdp_version != 2:
            raise ValueError("FSDP on CPU is supported with fsdp_version: 2 only")
        # Both singletons: AcceleratorState re-reads PartialState's fields when re-created.
        PartialState().distributed_type = DistributedType.FSDP
        accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = plugin
    return accelerator


def make_optimizer(groups: list[dict], cfg, device: torch.device) -> torch.optim.AdamW:
    """AdamW; on CUDA the fused implementation (one kernel for all parameters instead of a
    foreach loop of element-wise kernels), with the same update in fp32."""
    return torch.optim.AdamW(
        groups,
        lr=cfg.optim.lr,
        betas=tuple(cfg.optim.betas),
        eps=cfg.optim.eps,
        weight_decay=cfg.optim.weight_decay,
        fused=device.type == "cuda" or None,
    )


def freeze_reference(model, compute_dtype: torch.dtype | None):
    """A frozen reference that autocast need not cast again at every micro-batch: its Linear
    weights are stored once in the compute dtype (what autocast would round them to anyway, so
    the numbers are identical); norms and embeddings keep their dtype, as autocast keeps them."""
    model.eval().requires_grad_(False)
    if compute_dtype is None:
        return model
    # The head is left alone: it may be tied to the input embedding, which autocast never casts
    # (the log-prob kernel casts the head itself).
    head = model.model.get_output_embeddings()
    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module is not head:
            module.to(compute_dtype)
    return model
