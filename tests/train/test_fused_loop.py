"""The loop's fused head+loss path (loss.fused_head) against its two-pass path on the tiny model:
the same micro-batch loss, metrics and parameter gradients after accelerate's backward of the
loss over a global-batch denominator, for SFT, QRPO (randomized quantiles: the generator must be
rewound per chunk) and DPO, fp32 on CPU, with chunks small enough that a micro-batch spans
several of them."""

from __future__ import annotations

import random

import pytest
import torch

import qrpo.kernels.fused_head
from qrpo import kernels
from qrpo.common.config import build_config
from qrpo.common.model import load_model
from qrpo.common.packing import collate
from qrpo.common.tiny import TASK
from qrpo.kernels.sequence_model import SequenceLogprobModel
from qrpo.train.config import TrainConfig
from qrpo.train.fused import fused_head_applies
from qrpo.train.train import load_examples, micro_batch_loss


def _rows(pairs: bool) -> list[dict]:
    rng = random.Random(0)
    rows = []
    for prompt in TASK.prompts("train", 6):
        texts = [TASK.demonstration(prompt, rng, noise=0.7) for _ in range(4)]
        resp = [{"text": t, "reward": TASK.reward(prompt, t)} for t in texts]
        if not pairs:
            rows.append({"prompt": prompt, "responses": resp})
            continue
        resp.sort(key=lambda r: r["reward"])
        rows.append(
            {
                "prompt": prompt,
                "chosen": resp[-1]["text"] + " ok",  # never identical to the rejected one
                "rejected": resp[0]["text"],
                "score_chosen": resp[-1]["reward"] + 1.0,
                "score_rejected": resp[0]["reward"],
            }
        )
    return rows


def _config(tmp_path, algorithm: str, fused: bool) -> TrainConfig:
    import json

    path = tmp_path / "data.jsonl"
    rows = _rows(pairs=algorithm == "dpo")
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return build_config(
        TrainConfig,
        None,
        [
            f"data.path={path}",
            "data.max_length=48",
            f"loss.algorithm={algorithm}",
            "loss.beta=0.3",
            "loss.estimator=randomized",
            "loss.kernel_backend=torch",
            f"loss.fused_head={str(fused).lower()}",
            f"run.run_dir={tmp_path / 'run'}",
            "run.trackers=[]",
            "run.micro_batch_tokens=2048",
        ],
    )


@pytest.fixture(scope="module")
def models():
    """The tiny policy, moved off its reference so that log-ratios are not 0, and the reference."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    model_cfg = TrainConfig().model
    AcceleratorState._reset_state()
    accelerator = Accelerator(cpu=True)
    policy = SequenceLogprobModel(load_model(model_cfg, log=lambda *_: None), "torch")
    ref_model = SequenceLogprobModel(load_model(model_cfg, log=lambda *_: None), "torch").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.02)
    return accelerator, policy, ref_model


@pytest.mark.parametrize("algorithm", ["sft", "qrpo", "dpo"])
def test_fused_micro_batch_equals_two_pass(tmp_path, monkeypatch, models, algorithm):
    accelerator, policy, ref_model = models
    cfg = _config(tmp_path, algorithm, fused=True)
    assert fused_head_applies(cfg, torch.device("cpu"))
    examples, _ = load_examples(cfg)
    group = examples[:5]
    batch = collate(group)
    assert batch.host_score_cu_seqlens == batch.score_cu_seqlens.tolist()
    vocab = policy.model.get_output_embeddings().weight.shape[0]
    # 12-token chunks: the micro-batch spans several (completions have 5-7 tokens); a pair
    # longer than 12 tokens takes the two-pass fallback.
    monkeypatch.setitem(qrpo.kernels.fused_head.MAX_LOGITS_ELEMENTS, "cpu", 12 * vocab)
    assert len(qrpo.kernels.fused_head.plan_chunks(batch.host_score_cu_seqlens, 2, 12)) > 2

    calls = []
    fused_head_loss = kernels.fused_head_loss

    def spy(*args, **kwargs):
        calls.append(1)
        return fused_head_loss(*args, **kwargs)

    monkeypatch.setattr(kernels, "fused_head_loss", spy)
    results = []
    for fused in (False, True):
        cfg.loss.fused_head = fused
        policy.zero_grad(set_to_none=True)
        gen = torch.Generator().manual_seed(5)
        local, metrics = micro_batch_loss(
            cfg, accelerator, policy, ref_model, group, batch, None, gen, 0
        )
        accelerator.backward(local * 1 / 7.0)  # the loop's division by the global batch
        grads = {n: p.grad.clone() for n, p in policy.named_parameters() if p.grad is not None}
        results.append((local.detach(), metrics, grads, gen.get_state()))
    assert len(calls) == 1  # the second pass took the fused path, the first did not
    (l0, m0, g0, s0), (l1, m1, g1, s1) = results
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert m0.keys() == m1.keys()
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-5, atol=1e-6, equal_nan=True)
    assert g0.keys() == g1.keys() and len(g0) > 0
    for name in g0:
        scale = g0[name].abs().max().item() + 1e-12
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-4, atol=1e-5 * scale, msg=name)
    assert torch.equal(s0, s1)  # the generator ends where the two-pass path leaves it


def test_fused_training_run_equals_two_pass(tmp_path):
    """Three QRPO steps through train(), fused against two-pass: the same logged losses and
    gradient norms (several micro-batches per step, randomized quantiles)."""
    import json

    from qrpo.train.train import train

    logs = []
    for fused in (False, True):
        (tmp_path / str(fused)).mkdir()
        cfg = _config(tmp_path / str(fused), "qrpo", fused)
        cfg.run.max_steps, cfg.run.global_batch, cfg.run.micro_batch_tokens = 3, 8, 96
        cfg.run.plot = False
        cfg.optim.lr = 1e-3
        train(cfg)
        lines = (tmp_path / str(fused) / "run" / "metrics.jsonl").read_text().splitlines()
        logs.append([json.loads(line) for line in lines])
    assert len(logs[0]) == len(logs[1]) == 3
    for a, b in zip(*logs):
        for key in ("loss", "grad_norm"):
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-6)


def test_the_default_head_path_is_the_one_measured_faster(monkeypatch):
    """loss.fused_head=null runs two passes until a measurement names a shape where the fused
    pass wins; the reason is what the loop logs."""
    import qrpo.train.fused as fused

    def cfg(algorithm: str, fused_head: str) -> TrainConfig:
        keys = [f"loss.algorithm={algorithm}", f"loss.fused_head={fused_head}"]
        return build_config(TrainConfig, None, [*keys, "loss.kernel_backend=torch"])

    cuda = torch.device("cuda")  # a device object only: nothing runs on it
    on, why = fused.fused_head_choice(cfg("dpo", "null"), cuda)
    assert not on and "measured" in why and "loss.fused_head=true" in why
    assert fused.fused_head_choice(cfg("dpo", "true"), cuda) == (
        True,
        "head: fused head+loss pass (loss.fused_head=True)",
    )
    on, why = fused.fused_head_choice(cfg("kto", "true"), cuda)
    assert not on and "kto has no fused" in why
    monkeypatch.setattr(fused, "FUSED_FASTER", frozenset({("cuda", "dpo")}))
    assert fused.fused_head_applies(cfg("dpo", "null"), cuda)
    assert not fused.fused_head_applies(cfg("qrpo", "null"), cuda)
    assert not fused.fused_head_applies(cfg("dpo", "null"), torch.device("cpu"))
