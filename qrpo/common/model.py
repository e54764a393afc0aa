"""Loading tokenizers and causal LMs (local paths, hub names, or the embedded `tiny`)."""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from pathlib import Path

import torch

from qrpo.common.attention import ATTN_IMPLEMENTATIONS, choose_attention, register_attention
from qrpo.common.config import choice, doc
from qrpo.common.model_files import check_model_path
from qrpo.common.tiny import TINY_NAME, ensure_tiny

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Autocast around a model's forward (accelerate's mixed_precision names), shared by training and
# reference log-prob generation, which must compute in the same precision.
MIXED_PRECISIONS = ("no", "bf16", "fp16")


@dataclass
class ModelConfig:
    name_or_path: str = doc(TINY_NAME, "model directory, hub name, or 'tiny' (built offline)")
    tokenizer: str = doc("", "tokenizer path or name (default: same as the model)")
    dtype: str = choice("float32", tuple(DTYPES), "weights dtype")
    attn_implementation: str = choice(
        "auto",
        ATTN_IMPLEMENTATIONS,
        "attention over packed rows (auto: flash_attention_2 when installed on CUDA, else "
        "torch_varlen on CUDA, else per_sequence; sdpa and eager mask the whole row, quadratic "
        "in its length)",
    )
    liger: bool = doc(True, "apply liger-kernel RMSNorm/RoPE/SwiGLU patches when installed (CUDA)")
    hub_kernels: bool = doc(
        False,
        "let transformers swap layers for Hugging Face hub kernels at load (`use_kernels`): code "
        "downloaded at load time, and results that change with the hub; off, our kernels and "
        "liger's patches are what runs",
    )


def resolve(name_or_path: str) -> str:
    return str(ensure_tiny()) if name_or_path == TINY_NAME else name_or_path


def load_tokenizer(cfg: ModelConfig, key: str = "model.name_or_path"):
    from transformers import AutoTokenizer

    # The tokenizer's folder only: the weights are checked where they load (load_model, and the
    # scripts' up-front checks), not once more for every tokenizer.
    if cfg.tokenizer:
        key = key.replace("name_or_path", "tokenizer")
    check_model_path(key, cfg.tokenizer or cfg.name_or_path, weights=False)
    tok = AutoTokenizer.from_pretrained(resolve(cfg.tokenizer or cfg.name_or_path))
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(
    cfg: ModelConfig, device: torch.device | str = "cpu", *, log=print, key="model.name_or_path"
):
    """The causal LM; a path that cannot load is a one-line ModelError naming `key`."""
    from transformers import AutoModelForCausalLM

    check_model_path(key, cfg.name_or_path)
    device = torch.device(device)
    attn, why = choose_attention(cfg.attn_implementation, device)
    register_attention()
    path = resolve(cfg.name_or_path)
    if cfg.liger and device.type == "cuda":
        _apply_liger(path, log)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=DTYPES[cfg.dtype], attn_implementation=attn, use_kernels=cfg.hub_kernels
    )
    log(
        f"model {cfg.name_or_path} ({Path(path).name}): attention path = {attn} ({why}), "
        f"dtype = {cfg.dtype}"
    )
    return model


def _apply_liger(path: str, log) -> None:
    """Liger's fused RMSNorm/RoPE/SwiGLU; never its loss (our log-prob kernel replaces it)."""
    if importlib.util.find_spec("liger_kernel") is None:
        return
    from liger_kernel.transformers import _apply_liger_kernel
    from transformers import AutoConfig

    model_type = AutoConfig.from_pretrained(path).model_type
    try:
        _apply_liger_kernel(
            model_type,
            rope=True,
            rms_norm=True,
            swiglu=True,
            cross_entropy=False,
            fused_linear_cross_entropy=False,
        )
        log(f"liger-kernel patches applied for {model_type}")
    except Exception as err:  # unsupported architecture: run without
        log(f"liger-kernel not applied ({err})")
