"""Packed attention paths (qrpo/common/attention.py): every path gives each sequence of a packed row
the log-prob it has alone, on the tiny grouped-query model (4 heads, 2 key/value heads), with
many short sequences, one long one and a one-token completion."""

import importlib.util
import random

import pytest
import torch

from qrpo.common.attention import bucket_plan, choose_attention
from qrpo.common.config import ConfigError, build_config
from qrpo.common.model import ModelConfig, load_model
from qrpo.common.packing import Example, Sequence, collate
from qrpo.kernels.sequence_model import SequenceLogprobModel
from qrpo.train.config import TrainConfig

CUDA = torch.cuda.is_available()


def _examples(vocab: int, seed: int = 0) -> list[Example]:
    """Sequences of 2..40 tokens, one of 200, and one whose completion is a single token."""
    rng = random.Random(seed)
    lengths = [rng.randint(2, 40) for _ in range(23)] + [200, 9]
    out = []
    for n in lengths:
        ids = [rng.randrange(3, vocab) for _ in range(n)]
        prompt_len = n - 1 if n == 9 else rng.randint(1, n - 1)
        out.append(Example([Sequence(ids, prompt_len, 0)]))
    return out


def _direct_logps(causal_lm, example: Example) -> torch.Tensor:
    """Independent reference: full logits of the sequence alone, log-softmax, gather."""
    s = example.sequences[0]
    ids = torch.tensor(s.input_ids, device=causal_lm.device)[None]
    logits = causal_lm(input_ids=ids, use_cache=False).logits[0].double()
    logp = logits.log_softmax(-1)[:-1].gather(1, ids[0, 1:, None])[:, 0]
    return logp[s.prompt_len - 1 :].sum()


def _packed_and_alone(path: str, device: str, dtype: str = "float32"):
    causal_lm = load_model(
        ModelConfig(attn_implementation=path, dtype=dtype), device, log=lambda *_: None
    ).to(device)
    model = SequenceLogprobModel(causal_lm, "torch").eval()
    examples = _examples(causal_lm.config.vocab_size)
    with torch.no_grad():
        packed = model(*collate(examples, device).model_inputs()).double()
        alone = torch.stack([_direct_logps(causal_lm, e) for e in examples])
    return packed, alone, model, examples


@pytest.mark.parametrize("path", ["per_sequence", "sdpa", "eager"])
def test_packed_row_gives_each_sequence_its_own_logprob(path):
    packed, alone, _, examples = _packed_and_alone(path, "cpu")
    assert len(packed) == len(examples)
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-4)


def test_per_sequence_gradients_equal_the_dense_masked_path():
    grads = {}
    for path in ("per_sequence", "sdpa"):
        causal_lm = load_model(ModelConfig(attn_implementation=path), log=lambda *_: None)
        model = SequenceLogprobModel(causal_lm, "torch")
        batch = collate(_examples(causal_lm.config.vocab_size))
        model(*batch.model_inputs()).sum().backward()
        grads[path] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["sdpa"].items():
        torch.testing.assert_close(grads["per_sequence"][name], g, rtol=1e-4, atol=1e-5)


def test_bucket_plan_gathers_each_sequence_and_scatters_back():
    cu = [0, 5, 6, 18, 21, 32, 32, 40]  # lengths 5, 1, 12, 3, 11, 0, 8
    plan = bucket_plan(cu, "cpu")
    tokens = torch.arange(cu[-1])
    blocks = [tokens[g] for g in plan.gather]
    flat = torch.cat([b.reshape(-1) for b in blocks])
    assert torch.equal(flat[plan.scatter], tokens)  # every token finds itself
    for block in blocks:  # a row is one sequence, padded by repeating its last token
        for row in block:
            first = int(row[0])
            start = max(i for i in range(len(cu)) if cu[i] <= first)
            n = cu[start + 1] - cu[start]
            assert row.tolist() == [min(first + j, first + n - 1) for j in range(len(row))]
        lengths = [len(set(r.tolist())) for r in block]
        assert min(lengths) >= 0.8 * block.shape[1]  # bucket ratio: padding is bounded


def test_registered_paths_generate_like_sdpa_with_left_padding():
    """Without packing (generation, a padded batch) the two registered paths are sdpa."""
    from qrpo.common.model import load_tokenizer

    tok = load_tokenizer(ModelConfig())
    tok.padding_side = "left"
    enc = tok(["12 9 4 =", "3 ="], return_tensors="pt", padding=True)
    outs = []
    for path in ("sdpa", "per_sequence", "torch_varlen"):
        model = load_model(ModelConfig(attn_implementation=path), log=lambda *_: None)
        out = model.generate(
            **enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id
        )
        outs.append(out)
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])


def test_auto_picks_a_packed_path_and_forced_paths_are_kept():
    assert choose_attention("auto", torch.device("cpu"))[0] == "per_sequence"
    assert choose_attention("sdpa", torch.device("cpu")) == (
        "sdpa",
        "set by model.attn_implementation",
    )
    with pytest.raises(ConfigError, match="model.attn_implementation.*flash_attention_2"):
        build_config(TrainConfig, None, ["model.attn_implementation=flash"])


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_torch_varlen_packed_row_matches_each_sequence_alone_bf16():
    packed, alone, _, _ = _packed_and_alone("torch_varlen", "cuda", "bfloat16")
    ref, _, _, _ = _packed_and_alone("per_sequence", "cuda", "bfloat16")
    # bf16 weights and activations: agreement at bf16's resolution, summed over the tokens.
    torch.testing.assert_close(packed, alone, rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(packed, ref, rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_torch_varlen_gradients_match_per_sequence_bf16():
    grads = {}
    for path in ("torch_varlen", "per_sequence"):
        causal_lm = load_model(
            ModelConfig(attn_implementation=path, dtype="bfloat16"), "cuda", log=lambda *_: None
        ).to("cuda")
        model = SequenceLogprobModel(causal_lm, "torch")
        batch = collate(_examples(causal_lm.config.vocab_size), "cuda")
        model(*batch.model_inputs()).float().sum().backward()
        grads[path] = torch.cat([p.grad.float().reshape(-1) for p in model.parameters()])
    err = (grads["torch_varlen"] - grads["per_sequence"]).norm() / grads["per_sequence"].norm()
    assert err < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_flash_attention_2_packed_row_matches_each_sequence_alone_bf16():
    pytest.importorskip("flash_attn")
    packed, alone, _, _ = _packed_and_alone("flash_attention_2", "cuda", "bfloat16")
    torch.testing.assert_close(packed, alone, rtol=2e-2, atol=5e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_torch_varlen_in_fp32_falls_back_to_per_sequence():
    packed, alone, _, _ = _packed_and_alone("torch_varlen", "cuda", "float32")
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-3)


def _varlen_on_cpu(q, k, v, cu_q, cu_k, max_q, max_k, *, scale=None, window_size, enable_gqa):
    """varlen_attn's contract ([T, H, d] rows, boundaries, causal by window (-1, 0)) computed
    per sequence with sdpa: lets the CPU test check our layout and keyword plumbing."""
    assert window_size == (-1, 0) and enable_gqa and cu_q.dtype == torch.int32
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max())
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(
            qs, ks, vs, is_causal=True, scale=scale, enable_gqa=True
        )
        out[a:b] = o.transpose(0, 1)
    return out


def test_torch_varlen_plumbing_with_a_cpu_stand_in(monkeypatch):
    """The layout, GQA and causal keywords we hand to varlen_attn, checked on CPU with a
    stand-in of the same contract (the real kernel needs CUDA: gpu-marked tests)."""
    import qrpo.common.attention as attention

    monkeypatch.setattr(attention, "_varlen_kernel_usable", lambda q: True)
    monkeypatch.setattr(attention, "_varlen_attn", lambda: _varlen_on_cpu)
    packed, alone, _, _ = _packed_and_alone("torch_varlen", "cpu")
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-4)


def _varlen_without_causality(q, k, v, cu_q, cu_k, max_q, max_k, **options):
    """A stand-in that ignores the causal keyword: what a renamed keyword would silently do."""
    out = torch.empty_like(q)
    for a, b in zip(cu_q[:-1].tolist(), cu_q[1:].tolist()):
        qs, ks, vs = (x[a:b].transpose(0, 1) for x in (q, k, v))
        o = torch.nn.functional.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)
        out[a:b] = o.transpose(0, 1)
    return out


@pytest.mark.parametrize(
    "kernel, failure",
    [(_varlen_on_cpu, None), (_varlen_without_causality, "output differs from causal sdpa")],
)
def test_varlen_probe_passes_the_contract_and_catches_a_non_causal_kernel(
    monkeypatch, kernel, failure
):
    import qrpo.common.attention as attention

    monkeypatch.setattr(attention, "_varlen_kernel_usable", lambda q: True)
    monkeypatch.setattr(attention, "_varlen_attn", lambda: kernel)
    attention.varlen_probe_failure.cache_clear()
    try:
        got = attention.varlen_probe_failure(torch.device("cpu"))
    finally:
        attention.varlen_probe_failure.cache_clear()
    assert got == failure if failure is None else got.startswith(failure)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
def test_varlen_probe_passes_on_this_gpu_and_auto_picks_torch_varlen():
    import qrpo.common.attention as attention

    if importlib.util.find_spec("flash_attn") is not None or not attention.torch_varlen_available():
        pytest.skip("auto picks flash-attn, or this torch has no varlen_attn")
    assert attention.varlen_probe_failure(torch.device("cuda")) is None
    assert choose_attention("auto", torch.device("cuda"))[0] == "torch_varlen"
