"""The training bench's workload: presets, its config, the synthetic pairs and word-level
tokenizer, and the model, data and per-system training configs it prepares once (qrpo/train/bench.py
runs the systems on them).
"""

from __future__ import annotations

import dataclasses
import json
import platform
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from qrpo.common.config import ConfigError, build_config, doc

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; words t0, t1, ... follow
PAD, BOS, EOS, UNK = SPECIALS
OUR_SYSTEMS = {  # name -> (algorithm, reference source, data file)
    "ours_dpo": ("dpo", "model", "pairs.jsonl"),
    "ours_dpo_precomputed": ("dpo", "data", "pairs_ref_dpo.jsonl"),
    "ours_qrpo_precomputed": ("qrpo", "data", "pairs_ref_qrpo.jsonl"),
    "ours_qrpo_reference": ("qrpo", "model", "pairs.jsonl"),
}
TRL_SYSTEMS = {  # name -> DPOConfig settings beyond the ones every TRL system shares
    "trl_dpo": {},  # TRL's defaults: the reference model runs on the fly
    # The like-for-like peer of our precomputed systems: TRL computes the reference log-probs in
    # one pass before its first step (untimed, as our precompute in `prepare` is untimed).
    "trl_dpo_precomputed": {"precompute_ref_log_probs": True},
}
SYSTEMS = (*OUR_SYSTEMS, *TRL_SYSTEMS)
DEFAULT_SYSTEMS = [
    "ours_dpo",
    "ours_qrpo_precomputed",
    "ours_qrpo_reference",
    "trl_dpo",
    "trl_dpo_precomputed",
]

# Workload presets; a config field left at 0 / [] / "" / None takes its workload's value.
WORKLOADS = {
    # Head-dominated on purpose (V*d = 8.2M of 9.8M matmul parameters), as in real LMs' heads.
    "cpu": dict(
        hidden_size=256,
        num_layers=2,
        num_heads=4,
        num_kv_heads=4,
        intermediate_size=688,
        vocab_size=32000,
        tie_embeddings=False,
        prompt_tokens=[40, 56],
        completion_tokens=[120, 180],
        dtype="float32",
        steps=6,
        warmup=2,
        # Chosen at commit 41e53f4, when CPU attention masked the whole packed row: ~1k-token
        # micro-batches were faster than one 8k row (1751 vs 1495 tokens/s for DPO on 2 cores).
        # Kept so that CPU figures stay comparable; per_sequence attention no longer needs it.
        micro_batch_tokens=1024,
    ),
    # Llama-3.2-1B dims (tied 128k head); fp32 master weights with bf16 autocast in both loops.
    "gpu": dict(
        hidden_size=2048,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        intermediate_size=8192,
        vocab_size=128256,
        tie_embeddings=True,
        prompt_tokens=[240, 256],
        completion_tokens=[752, 768],
        dtype="bfloat16",
        # 20 measured steps: a run's few slow steps (new padded shapes in TRL, recompiles) then
        # move the median step, the headline figure, by little.
        steps=20,
        warmup=3,
        micro_batch_tokens=16384,
    ),
}


@dataclass
class BenchConfig:
    workload: str = doc("cpu", "preset: cpu (2 cores, minutes) | gpu (1B-class, bf16, 1k tokens)")
    systems: list = doc(DEFAULT_SYSTEMS, f"systems to run, from {', '.join(SYSTEMS)}")
    steps: int = doc(0, "measured optimizer steps (0: the workload's)")
    warmup: int = doc(0, "warm-up steps before measuring, >= 1 (0: the workload's)")
    pairs_per_step: int = doc(
        8, "preference pairs per optimizer step (global batch = 2x sequences)"
    )
    out: str = doc("runs/bench_train", "output folder: bench.json, bench.png, systems/, work/")
    seed: int = doc(0, "seed of the model initialisation and the synthetic data")
    hidden_size: int = doc(0, "model hidden size (0: the workload's)")
    num_layers: int = doc(0, "decoder layers (0: the workload's)")
    num_heads: int = doc(0, "attention heads (0: the workload's)")
    num_kv_heads: int = doc(0, "key/value heads (0: the workload's)")
    intermediate_size: int = doc(0, "MLP intermediate size (0: the workload's)")
    vocab_size: int = doc(0, "vocabulary size, including 4 special tokens (0: the workload's)")
    tie_embeddings: Optional[bool] = doc(None, "tie input embedding and LM head (null: workload's)")
    prompt_tokens: list = doc([], "[min, max] prompt tokens, BOS included ([]: the workload's)")
    completion_tokens: list = doc([], "[min, max] completion tokens, EOS included ([]: workload's)")
    dtype: str = doc("", "float32 | bfloat16 (fp32 weights, bf16 autocast) ('': the workload's)")
    micro_batch_tokens: int = doc(0, "our loop's token budget per micro-batch (0: the workload's)")
    attn_implementation: str = doc("auto", "attention for every system (auto: as our loop picks)")
    lr: float = doc(1e-5, "learning rate of every system (constant, no warm-up)", gt=0)
    dpo_beta: float = doc(0.1, "DPO beta (ours and TRL)", gt=0)
    qrpo_beta: float = doc(0.01, "QRPO beta", gt=0)
    ref_rewards: int = doc(4, "reference rewards per prompt in the data (QRPO quantiles)")
    peak_tflops: float = doc(0.0, "matmul peak for MFU (0: measured once at the start)", ge=0)
    timeout_s: int = doc(3600, "time limit of each system's subprocess")
    system: str = doc("", "internal: run one system (or 'prepare') in this process")

    def __post_init__(self):
        if self.workload not in WORKLOADS:
            raise ConfigError(f"workload must be one of {list(WORKLOADS)}, got '{self.workload}'")
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown:
            raise ConfigError(f"systems: unknown {unknown}; choose from {list(SYSTEMS)}")
        if self.system not in ("", "prepare", *SYSTEMS):
            raise ConfigError(f"system must be 'prepare' or one of {list(SYSTEMS)}")
        if self.warmup < 0 or self.steps < 0 or self.pairs_per_step < 1:
            raise ConfigError("steps and warmup must be >= 0 (0: preset), pairs_per_step >= 1")
        for name in ("prompt_tokens", "completion_tokens"):
            value = getattr(self, name)
            if value and (len(value) != 2 or not 2 <= value[0] <= value[1]):
                raise ConfigError(f"{name} must be [min, max] with 2 <= min <= max, got {value}")
        if self.dtype not in ("", "float32", "bfloat16"):
            raise ConfigError(f"dtype must be float32 or bfloat16, got '{self.dtype}'")
        if self.vocab_size and self.vocab_size <= len(SPECIALS):
            raise ConfigError(f"vocab_size must be > {len(SPECIALS)}")

    @property
    def total_steps(self) -> int:
        return self.warmup + self.steps

    @property
    def max_length(self) -> int:
        return self.prompt_tokens[1] + self.completion_tokens[1]


def resolve(cfg: BenchConfig) -> BenchConfig:
    """Fill every field left at its 'use the workload' value from the preset."""

    def unset(value) -> bool:
        return value is None or (not isinstance(value, bool) and value in (0, "", []))

    preset = WORKLOADS[cfg.workload]
    cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if unset(getattr(cfg, k))})
    if cfg.warmup < 1:
        raise ConfigError("warmup must be >= 1: the first step carries one-off costs")
    return cfg


# --------------------------------------------------------------------------- model and data


def word_tokenizer(vocab_size: int):
    """Word-level tokenizer: specials, then words t0..t{V-5}; whitespace splits words, so every
    word is one token. Encoding adds BOS (like Llama's); EOS is added to completions by each
    trainer. A string '</s>' inside text is the EOS token (TRL appends it as text)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIALS)}
    vocab.update({f"t{i}": len(SPECIALS) + i for i in range(vocab_size - len(SPECIALS))})
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK
    )


def synthetic_pairs(cfg: BenchConfig, n_pairs: int) -> list[dict]:
    """Random-word prompts and completions of exact token lengths (BOS and EOS included).
    Completions start with a space: TRL tokenizes prompt + completion as one string."""
    rng = random.Random(cfg.seed)
    words = cfg.vocab_size - len(SPECIALS)

    def text(n_words: int) -> str:
        return " ".join(f"t{rng.randrange(words)}" for _ in range(n_words))

    rows = []
    for i in range(n_pairs):
        prompt = text(rng.randint(*cfg.prompt_tokens) - 1)  # + BOS
        chosen, rejected = (" " + text(rng.randint(*cfg.completion_tokens) - 1) for _ in "cr")
        rewards = sorted((rng.random() for _ in range(2)), reverse=True)
        rows.append(
            {
                "prompt_id": f"p{i}",
                "prompt": prompt,
                "chosen": chosen,
                "rejected": rejected,
                "score_chosen": rewards[0],
                "score_rejected": rewards[1],
                "ref_rewards": [rng.random() for _ in range(cfg.ref_rewards)],
            }
        )
    return rows


def pair_tokens(row: dict) -> int:
    """Tokens of a pair as both trainers see it: 2 x (BOS + prompt) + both completions + EOS."""
    prompt = 1 + len(row["prompt"].split())
    return 2 * prompt + len(row["chosen"].split()) + len(row["rejected"].split()) + 2


def system_train_config(cfg: BenchConfig, system: str, work: Path, run_dir: Path):
    from qrpo.train.config import TrainConfig

    algorithm, ref_source, data = OUR_SYSTEMS[system]
    beta = cfg.dpo_beta if algorithm == "dpo" else cfg.qrpo_beta
    return build_config(
        TrainConfig,
        None,
        [
            f"model.name_or_path={work / 'model'}",
            f"model.attn_implementation={cfg.attn_implementation}",
            "model.dtype=float32",
            f"data.path={work / data}",
            f"data.max_length={cfg.max_length}",
            f"loss.algorithm={algorithm}",
            f"loss.beta={beta}",
            f"ref.source={ref_source}",
            f"optim.lr={cfg.lr}",
            "optim.scheduler=constant",
            "optim.warmup_ratio=0.0",
            f"run.run_dir={run_dir}",
            f"run.seed={cfg.seed}",
            "run.epochs=1",
            f"run.max_steps={cfg.total_steps}",
            f"run.global_batch={2 * cfg.pairs_per_step}",
            f"run.micro_batch_tokens={max(cfg.micro_batch_tokens, 2 * cfg.max_length)}",
            # quoted: a bare `no` is YAML for false
            f"run.mixed_precision='{'bf16' if cfg.dtype == 'bfloat16' else 'no'}'",
            "run.trackers=[]",
            "run.plot=false",
            f"run.peak_tflops={cfg.peak_tflops}",
        ],
    )


def prepare(cfg: BenchConfig) -> dict:
    """Model, tokenizer, data (with and without reference log-probs), FLOP counts and the peak;
    in its own subprocess, so no system's process pays for it."""
    import torch
    from transformers import LlamaForCausalLM

    from qrpo.common.flops import measure_peak_tflops, train_flops_per_token
    from qrpo.common.model import load_model
    from qrpo.common.tiny import model_config
    from qrpo.kernels.sequence_model import SequenceLogprobModel, autocast, sequence_logps
    from qrpo.train.train import load_examples

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.workload == "gpu" and device.type != "cuda":
        raise ConfigError("workload=gpu needs a CUDA device")
    work = Path(cfg.out) / "work"
    shutil.rmtree(work, ignore_errors=True)
    tokenizer = word_tokenizer(cfg.vocab_size)
    # The tiny model's Llama config (qrpo/common/tiny.py) at the workload's sizes.
    model_cfg = model_config(
        cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(2048, cfg.max_length),
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(cfg.seed)
    model = LlamaForCausalLM(model_cfg)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    flops = {
        "policy": train_flops_per_token(model, with_reference=False),
        "with_reference": train_flops_per_token(model, with_reference=True),
    }
    n_params = sum(p.numel() for p in model.parameters())
    del model

    rows = synthetic_pairs(cfg, cfg.total_steps * cfg.pairs_per_step)
    write_jsonl_rows(work / "pairs.jsonl", rows)
    # Reference log-probs with our own code on the saved model, as the loop's step-0 check
    # recomputes them: same kernel, same autocast, and the checked rows packed as the check packs
    # them (the first ref.check_rows examples on their own), so that under bf16 the two agree to
    # the bit rather than to the rounding of differently shaped GEMMs. One file per algorithm:
    # its examples (pairs or single sequences) decide the check's packing.
    ref = None
    for system in [s for s in OUR_SYSTEMS if OUR_SYSTEMS[s][1] == "data" and s in cfg.systems]:
        tcfg = system_train_config(cfg, system, work, work / "unused")
        tcfg.data.path = str(work / "pairs.jsonl")
        examples, _ = load_examples(tcfg)
        if ref is None:
            ref = SequenceLogprobModel(load_model(tcfg.model, device), tcfg.loss.kernel_backend)
            ref.to(device).eval().requires_grad_(False)
        n, budget = tcfg.ref.check_rows, tcfg.run.micro_batch_tokens
        with autocast(device, tcfg.run.mixed_precision):  # the loop's own precision policy
            logps = [
                *sequence_logps(ref, examples[:n], budget, device).cpu().tolist(),
                *sequence_logps(ref, examples[n:], budget, device).cpu().tolist(),
            ]
        refs = [dict(r) for r in rows]
        for i, row in enumerate(refs):  # sequences in order: chosen, rejected of each pair
            row["ref_logp_chosen"], row["ref_logp_rejected"] = logps[2 * i], logps[2 * i + 1]
        write_jsonl_rows(work / OUR_SYSTEMS[system][2], refs)
    del ref

    dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
    # The best of three: a process that shares the device for a moment lowers one measurement.
    peak = cfg.peak_tflops or max(measure_peak_tflops(device, dtype) for _ in range(3))
    meta = {
        "peak_tflops": peak,
        "flops_per_token": flops,
        "parameters": n_params,
        "pairs": len(rows),
        "total_tokens": sum(pair_tokens(r) for r in rows),
        "device": device_name(device),
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def write_jsonl_rows(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [x for x in cpuinfo.read_text().splitlines() if x.startswith("model name")]
        name = models[0].split(":", 1)[1].strip() if models else name
    return f"{name}, {torch.get_num_threads()} threads"
