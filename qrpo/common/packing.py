"""Padding-free packing: sequences, examples, and packed micro-batches on the device.

An *example* is what a loss sees as one item: one sequence or a chosen/rejected pair, which
always stays in one micro-batch. A micro-batch is one row of concatenated sequences, `[1, T]`,
with `position_ids` restarting at 0 per sequence and `cu_seqlens` marking the boundaries;
attention stays inside each sequence (qrpo/common/attention.py: varlen kernels, or per-sequence
buckets; never a dense [T, T] mask unless sdpa/eager is forced). Training, reference log-probs
(generate) and evaluation all pack through here, so they score a sequence identically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from qrpo.common.constants import IGNORE_INDEX
from qrpo.common.tokenize import shifted_targets


@dataclass
class Sequence:
    """One prompt+completion with what the losses need to know about it."""

    input_ids: list[int]
    prompt_len: int
    prompt_index: int  # index of its prompt among the data set's distinct prompts
    reward: float = math.nan
    ref_logp: float = math.nan
    ref_rewards: list[float] = field(default_factory=list)
    ref_index: int = -1  # its own position among ref_rewards, when it is a reference sample
    desirable: bool = True  # KTO label
    sigma: float = 1.0  # QRPO scaled_normal_icdf: normalised std of the prompt's ref rewards

    @property
    def num_completion_tokens(self) -> int:
        return len(self.input_ids) - self.prompt_len


@dataclass
class Example:
    sequences: list[Sequence]  # [seq] or [chosen, rejected]

    @property
    def num_tokens(self) -> int:
        return sum(len(s.input_ids) for s in self.sequences)


def pack(examples: list[Example], token_budget: int) -> list[list[Example]]:
    """Greedy first-fit in order: micro-batches of at most `token_budget` tokens."""
    batches: list[list[Example]] = []
    used = 0
    for ex in examples:
        if not batches or used + ex.num_tokens > token_budget:
            batches.append([])
            used = 0
        batches[-1].append(ex)
        used += ex.num_tokens
    return batches


@dataclass
class Batch:
    """A packed micro-batch on the device; per-sequence tensors are in packing order."""

    input_ids: torch.Tensor  # [1, T]
    position_ids: torch.Tensor  # [1, T]
    targets: torch.Tensor  # [T] shifted targets, -100 where not scored
    cu_seqlens: torch.Tensor  # [S+1] int32, sequence boundaries in the packed row
    # Only completion positions reach the LM head: prompt rows have no target, and skipping them
    # saves their share of the head's FLOPs (the head dominates at large vocabularies). Computed
    # here on the host, so the device never needs a sync to find them.
    score_index: torch.Tensor  # [M] positions in the packed row whose target counts
    score_targets: torch.Tensor  # [M]
    score_cu_seqlens: torch.Tensor  # [S+1] sequence boundaries among the M scored positions
    num_tokens: torch.Tensor  # [S] completion tokens per sequence
    rewards: torch.Tensor  # [S]
    ref_logps: torch.Tensor  # [S] (NaN when not precomputed)
    ref_rewards: torch.Tensor  # [S, K] padded
    ref_mask: torch.Tensor  # [S, K] True where a reference reward exists
    ref_index: torch.Tensor  # [S] own index in ref_rewards or -1
    prompt_index: torch.Tensor  # [S]
    desirable: torch.Tensor  # [S] bool
    sigma: torch.Tensor  # [S]
    num_examples: int
    max_seqlen: int  # longest sequence in the row (varlen attention's tile count)
    host_score_cu_seqlens: list[int]  # score_cu_seqlens on the host: chunk plans need no sync

    def model_inputs(self) -> tuple[torch.Tensor, ...]:
        """The arguments of SequenceLogprobModel.forward."""
        return (
            self.input_ids,
            self.position_ids,
            self.score_index,
            self.score_targets,
            self.score_cu_seqlens,
            self.cu_seqlens,
            self.max_seqlen,
        )

    @property
    def total_tokens(self) -> int:
        return self.input_ids.shape[1]


def collate(examples: list[Example], device: torch.device | str = "cpu") -> Batch:
    seqs = [s for e in examples for s in e.sequences]
    ids, pos, tgt, cu, score, score_cu = [], [], [], [0], [], [0]
    for s in seqs:
        targets = shifted_targets(s.input_ids, s.prompt_len)
        score.extend(cu[-1] + i for i, v in enumerate(targets) if v != IGNORE_INDEX)
        score_cu.append(len(score))
        ids.extend(s.input_ids)
        pos.extend(range(len(s.input_ids)))
        tgt.extend(targets)
        cu.append(cu[-1] + len(s.input_ids))
    k = max([len(s.ref_rewards) for s in seqs] + [1])
    ref_rewards = torch.zeros(len(seqs), k, dtype=torch.float32)
    ref_mask = torch.zeros(len(seqs), k, dtype=torch.bool)
    for i, s in enumerate(seqs):
        ref_rewards[i, : len(s.ref_rewards)] = torch.tensor(s.ref_rewards, dtype=torch.float32)
        ref_mask[i, : len(s.ref_rewards)] = True

    device = torch.device(device)
    pin = device.type == "cuda"

    def t(values, dtype):
        # Built on the host, copied from pinned memory without blocking: a plain copy from a
        # Python list would wait for the GPU to finish the previous micro-batch first.
        x = values if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
        return x.pin_memory().to(device, non_blocking=True) if pin else x.to(device)

    return Batch(
        input_ids=t(ids, torch.long)[None],
        position_ids=t(pos, torch.long)[None],
        targets=t(tgt, torch.long),
        cu_seqlens=t(cu, torch.int32),
        score_index=t(score, torch.long),
        score_targets=t([tgt[i] for i in score], torch.long),
        score_cu_seqlens=t(score_cu, torch.int32),
        num_tokens=t([s.num_completion_tokens for s in seqs], torch.float32),
        rewards=t([s.reward for s in seqs], torch.float32),
        ref_logps=t([s.ref_logp for s in seqs], torch.float32),
        ref_rewards=t(ref_rewards, torch.float32),
        ref_mask=t(ref_mask, torch.bool),
        ref_index=t([s.ref_index for s in seqs], torch.long),
        prompt_index=t([s.prompt_index for s in seqs], torch.long),
        desirable=t([s.desirable for s in seqs], torch.bool),
        sigma=t([s.sigma for s in seqs], torch.float32),
        num_examples=len(examples),
        max_seqlen=max(len(s.input_ids) for s in seqs),
        host_score_cu_seqlens=score_cu,
    )
