"""Training throughput: our loop against TRL's DPOTrainer on one workload, in one invocation.

    python -m train.bench                                  # CPU: 256-d Llama, V=32000, fp32, ~5 min
    python -m train.bench workload=gpu                     # GPU: Llama-3.2-1B-like, bf16, 1k tokens
    python -m train.bench steps=10 systems=[ours_dpo,trl_dpo] out=runs/bench_x
    python -m train.bench --help                           # every key

Systems (`systems=[...]`), each run in its own subprocess so that peak memory is its own:

    ours_dpo               our loop, DPO, reference model on the fly (like TRL's default)
    ours_dpo_precomputed   our loop, DPO on precomputed reference log-probs (not run by default)
    ours_qrpo_precomputed  our loop, QRPO (pairs as 2 pointwise samples), precomputed reference
    ours_qrpo_reference    our loop, QRPO, reference model on the fly
    trl_dpo                trl.DPOTrainer, gradient checkpointing off, otherwise its defaults
                           (its reference model runs on the fly); skipped when trl is missing

Every system trains the same randomly initialised Llama-config model (built here, fixed seed, no
hub) on the same synthetic pairs (fixed seed) with the same global batch, for `warmup` + `steps`
optimizer steps, one pass over the data. The tokenizer is a word-level vocabulary "t0", "t1", ...
so each space-separated word is one token and lengths are exact; prompts get BOS, completions get
EOS, in our tokenization and in TRL's alike (the bench checks that both count the same tokens).

Measurement, identical for every system: a global optimizer-step hook
(`torch.optim.optimizer.register_optimizer_step_post_hook`) stamps the end of each step (after a
device sync); the measured time is from the end of the last warm-up step to the end of the last
step, so it covers whole step periods (data, forward, backward, optimizer, logging). Tokens are all
real prompt+completion tokens of both sequences of each pair (no padding): from our loop's
`metrics.jsonl` (tokens_per_s * step_s per step) and from TRL's logged `num_tokens` (sum of the
attention mask). MFU = tokens/s * FLOP/token / peak, with `common.flops.train_flops_per_token`
(6N, plus 2N with an on-the-fly reference) and a matmul peak measured on this device in the
compute dtype before any system runs (`common.flops.measure_peak_tflops`, best of three); our
loop gets the same peak (`run.peak_tflops`), so the MFU it logs differs from the bench's only by
its timing boundaries (it times a step from its start to after the optimizer step, without
logging) and by how it averages (the mean of per-step MFUs; here total tokens over total time).
Peak memory is the child's peak RSS on CPU, `torch.cuda.max_memory_allocated` on GPU. Measured
step times that vary by more than 1.5x are reported as a warning: on a shared machine, rerun.

Writes OUT/bench.json (config, device, commit, per-system results and goal checks), OUT/bench.png
and, per system, OUT/systems/NAME/{log.txt,result.json}; the model and data are in OUT/work.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from common.config import ConfigError, build_config, doc, parse_config, save_config

ROOT = Path(__file__).resolve().parents[1]
SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3; words t0, t1, ... follow
PAD, BOS, EOS, UNK = SPECIALS
OUR_SYSTEMS = {  # name -> (algorithm, reference source, data file)
    "ours_dpo": ("dpo", "model", "pairs.jsonl"),
    "ours_dpo_precomputed": ("dpo", "data", "pairs_ref_dpo.jsonl"),
    "ours_qrpo_precomputed": ("qrpo", "data", "pairs_ref_qrpo.jsonl"),
    "ours_qrpo_reference": ("qrpo", "model", "pairs.jsonl"),
}
SYSTEMS = (*OUR_SYSTEMS, "trl_dpo")
DEFAULT_SYSTEMS = ["ours_dpo", "ours_qrpo_precomputed", "ours_qrpo_reference", "trl_dpo"]

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
        steps=10,
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
    lr: float = doc(1e-5, "learning rate of every system (constant, no warm-up)")
    dpo_beta: float = doc(0.1, "DPO beta (ours and TRL)")
    qrpo_beta: float = doc(0.01, "QRPO beta")
    ref_rewards: int = doc(4, "reference rewards per prompt in the data (QRPO quantiles)")
    peak_tflops: float = doc(0.0, "matmul peak for MFU (0: measured once at the start)")
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


def build_tokenizer(vocab_size: int):
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


def _train_config(cfg: BenchConfig, system: str, work: Path, run_dir: Path):
    from train.config import TrainConfig

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
    from transformers import LlamaConfig, LlamaForCausalLM

    from common.flops import measure_peak_tflops, train_flops_per_token
    from common.model import load_model
    from train.model import SequenceLogprobModel
    from train.train import load_examples, sequence_logps

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.workload == "gpu" and device.type != "cuda":
        raise ConfigError("workload=gpu needs a CUDA device")
    work = Path(cfg.out) / "work"
    shutil.rmtree(work, ignore_errors=True)
    tokenizer = build_tokenizer(cfg.vocab_size)
    model_cfg = LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads,
        num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=max(2048, cfg.max_length),
        tie_word_embeddings=cfg.tie_embeddings,
        rms_norm_eps=1e-5,
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
    _write_jsonl(work / "pairs.jsonl", rows)
    # Reference log-probs with our own code on the saved model, as the loop's step-0 check
    # recomputes them: same kernel, same autocast, and the checked rows packed as the check packs
    # them (the first ref.check_rows examples on their own), so that under bf16 the two agree to
    # the bit rather than to the rounding of differently shaped GEMMs. One file per algorithm:
    # its examples (pairs or single sequences) decide the check's packing.
    ref = None
    for system in [s for s in OUR_SYSTEMS if OUR_SYSTEMS[s][1] == "data" and s in cfg.systems]:
        tcfg = _train_config(cfg, system, work, work / "unused")
        tcfg.data.path = str(work / "pairs.jsonl")
        examples, _ = load_examples(tcfg)
        if ref is None:
            ref = SequenceLogprobModel(load_model(tcfg.model, device), tcfg.loss.kernel_backend)
            ref.to(device).eval().requires_grad_(False)
        n, budget = tcfg.ref.check_rows, tcfg.run.micro_batch_tokens
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.dtype == "bfloat16"):
            logps = [
                *sequence_logps(ref, examples[:n], budget, device).cpu().tolist(),
                *sequence_logps(ref, examples[n:], budget, device).cpu().tolist(),
            ]
        refs = [dict(r) for r in rows]
        for i, row in enumerate(refs):  # sequences in order: chosen, rejected of each pair
            row["ref_logp_chosen"], row["ref_logp_rejected"] = logps[2 * i], logps[2 * i + 1]
        _write_jsonl(work / OUR_SYSTEMS[system][2], refs)
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
        "device": _device_name(device),
    }
    (work / "meta.json").write_text(json.dumps(meta, indent=1))
    return meta


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def _device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        models = [x for x in cpuinfo.read_text().splitlines() if x.startswith("model name")]
        name = models[0].split(":", 1)[1].strip() if models else name
    return f"{name}, {torch.get_num_threads()} threads"


# --------------------------------------------------------------------------- one system


class StepClock:
    """Stamps the end of every optimizer step of every optimizer in this process (after a device
    sync), through torch's global step hook: the same boundary for our loop and for TRL's."""

    def __init__(self):
        import torch

        self.stamps: list[float] = []
        self._cuda = torch.cuda.is_available()
        self._handle = None

    def __enter__(self):
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self._handle = register_optimizer_step_post_hook(self._stamp)
        return self

    def __exit__(self, *exc):
        self._handle.remove()

    def _stamp(self, *_):
        if self._cuda:
            import torch

            torch.cuda.synchronize()
        self.stamps.append(time.perf_counter())


def summarize(stamps: list[float], tokens: list[int], warmup: int) -> dict:
    """Throughput over the steps after warm-up, from step-end stamps and tokens per step."""
    if len(stamps) != len(tokens) or len(stamps) <= warmup:
        raise RuntimeError(
            f"{len(stamps)} step stamps and {len(tokens)} token counts for {warmup} warm-up steps"
        )
    period = stamps[-1] - stamps[warmup - 1]
    measured = sum(tokens[warmup:])
    steps = len(stamps) - warmup
    times = [b - a for a, b in zip(stamps[warmup - 1 :], stamps[warmup:])]
    return {
        "tokens_per_s": measured / period,
        "step_s": period / steps,
        "step_spread": max(times) / min(times),  # well above 1: the machine was busy
        # Robust to a disturbed step (JSON only; the headline figure is the total above).
        "median_step_tokens_per_s": statistics.median(
            k / t for k, t in zip(tokens[warmup:], times)
        ),
        "measured_steps": steps,
        "measured_tokens": measured,
        "total_tokens": sum(tokens),
        "step_times_s": [b - a for a, b in zip(stamps, stamps[1:])],
        "tokens_per_step": tokens,
    }


def run_ours(cfg: BenchConfig, system: str, meta: dict) -> dict:
    from train.train import train

    work, sys_dir = Path(cfg.out) / "work", Path(cfg.out) / "systems" / system
    run_dir = sys_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would resume
    tcfg = _train_config(cfg, system, work, run_dir)
    with StepClock() as clock:
        train(tcfg)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    tokens = [round(r["tokens_per_s"] * r["step_s"]) for r in records]
    on_the_fly = OUR_SYSTEMS[system][1] == "model"
    out = {
        "reference": "on the fly" if on_the_fly else "precomputed",
        "flops_per_token": meta["flops_per_token"]["with_reference" if on_the_fly else "policy"],
        **summarize(clock.stamps, tokens, cfg.warmup),
    }
    measured = records[cfg.warmup :]
    out["loop_mfu"] = sum(r["mfu"] for r in measured) / len(measured)
    out["loop_tokens_per_s"] = out["measured_tokens"] / sum(r["step_s"] for r in measured)
    # Checkpoints are not part of the benchmark (a 1B model's optimizer state is ~15 GB).
    for path in run_dir.iterdir():
        if path.is_dir():
            shutil.rmtree(path)
    return out


def run_child(cfg: BenchConfig) -> None:
    """Internal mode: one system in this process, its result in OUT/systems/NAME/result.json."""
    cfg = resolve(cfg)
    if cfg.system == "prepare":
        prepare(cfg)
        return
    import torch

    from common.flops import peak_memory_gb

    meta = json.loads((Path(cfg.out) / "work" / "meta.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if cfg.system == "trl_dpo":
        from train.bench_trl import run_trl

        result = run_trl(cfg, meta)
    else:
        result = run_ours(cfg, cfg.system, meta)
    result["peak_memory_gb"] = peak_memory_gb(device)
    result["mfu"] = (
        result["tokens_per_s"] * result["flops_per_token"] / (meta["peak_tflops"] * 1e12)
    )
    path = Path(cfg.out) / "systems" / cfg.system / "result.json"
    path.write_text(json.dumps({"system": cfg.system, "status": "ok", **result}, indent=1))


# --------------------------------------------------------------------------- parent


def _child(config_file: Path, system: str, log: Path, timeout: int) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "train.bench", "--config", str(config_file), f"system={system}"]
    with log.open("w") as f:
        try:
            return subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout
            ).returncode
        except subprocess.TimeoutExpired:
            f.write(f"\nbench: killed after timeout_s={timeout}\n")
            return -1


def _tail(path: Path, lines: int = 15) -> str:
    return (
        "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""
    )


def run(cfg: BenchConfig) -> dict:
    """Prepare, run every system in its own subprocess, then table, JSON and chart."""
    cfg = resolve(dataclasses.replace(cfg, out=str(Path(cfg.out).resolve()), system=""))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    config_file = save_config(cfg, out, "bench_config.yaml")
    print(f"bench: preparing model and data in {out / 'work'}", flush=True)
    log = out / "work.log"
    if _child(config_file, "prepare", log, cfg.timeout_s) != 0:
        raise RuntimeError(f"bench: preparation failed; end of {log}:\n{_tail(log, 30)}")
    meta = json.loads((out / "work" / "meta.json").read_text())
    cfg = dataclasses.replace(cfg, peak_tflops=meta["peak_tflops"])
    config_file = save_config(cfg, out, "bench_config.yaml")
    print(
        f"bench: {meta['device']}, peak {meta['peak_tflops']:.3g} TFLOP/s ({cfg.dtype}), "
        f"{meta['parameters'] / 1e6:.1f}M parameters, {meta['pairs']} pairs, "
        f"{meta['total_tokens']} tokens, {cfg.warmup} warm-up + {cfg.steps} measured steps",
        flush=True,
    )

    results = []
    for system in cfg.systems:
        sys_dir = out / "systems" / system
        shutil.rmtree(sys_dir, ignore_errors=True)
        if system == "trl_dpo" and not _have("trl"):
            results.append({"system": system, "status": "skipped", "note": "trl not installed"})
            print(f"bench: {system} skipped (trl not installed)", flush=True)
            continue
        print(f"bench: running {system}", flush=True)
        start = time.perf_counter()
        rc = _child(config_file, system, sys_dir / "log.txt", cfg.timeout_s)
        result_file = sys_dir / "result.json"
        if rc == 0 and result_file.is_file():
            result = json.loads(result_file.read_text())
        else:
            result = {"system": system, "status": "failed", "note": _tail(sys_dir / "log.txt")}
            print(f"bench: {system} failed (exit {rc}):\n{result['note']}", flush=True)
        result["wall_s"] = time.perf_counter() - start
        result["ref_check_gap"] = _ref_check_gap(sys_dir / "log.txt")
        if result["status"] == "ok" and result["total_tokens"] != meta["total_tokens"]:
            result["note"] = (
                f"counted {result['total_tokens']} tokens over all steps, the data has "
                f"{meta['total_tokens']}: token counts differ from the bench's definition"
            )
        results.append(result)

    trl = next((r for r in results if r["system"] == "trl_dpo" and r["status"] == "ok"), None)
    for r in results:
        if r["status"] == "ok" and trl is not None:
            r["ratio_to_trl"] = r["tokens_per_s"] / trl["tokens_per_s"]
    report = {
        "config": dataclasses.asdict(cfg),
        "device": meta["device"],
        "environment": _environment(),
        "peak_tflops": meta["peak_tflops"],
        "parameters": meta["parameters"],
        "flops_per_token": meta["flops_per_token"],
        "total_tokens": meta["total_tokens"],
        "results": results,
        "goals": goals(cfg, results),
        "warnings": [
            f"{r['system']}: measured step times vary {r['step_spread']:.1f}x (slowest/fastest); "
            "another process probably shared the device: rerun on an idle machine"
            for r in results
            if r["status"] == "ok" and r["step_spread"] > 1.5
        ],
        "wall_s": time.perf_counter() - t0,
    }
    (out / "bench.json").write_text(json.dumps(report, indent=1))
    print("\n" + table(results))
    for g in report["goals"]:
        print(f"goal {'met ' if g['met'] else 'MISS'}: {g['goal']}")
    for w in report["warnings"]:
        print(f"warning: {w}")
    plot(results, out / "bench.png", title=f"{cfg.workload} workload, {meta['device']}")
    print(f"\nbench: {out / 'bench.json'}, {out / 'bench.png'} ({report['wall_s']:.0f} s)")
    return report


def _have(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _ref_check_gap(log: Path) -> float | None:
    """The largest gap of our loop's step-0 check of precomputed log-probs, from its log."""
    marker = "precomputed log-probs match the starting policy (max gap "
    for line in log.read_text(errors="replace").splitlines() if log.is_file() else []:
        if marker in line:
            return float(line.split(marker)[1].split()[0])
    return None


def _environment() -> dict:
    import importlib.metadata as md

    env = {"python": platform.python_version(), "platform": platform.platform()}
    for package in ("torch", "transformers", "accelerate", "trl"):
        try:
            env[package] = md.version(package)
        except md.PackageNotFoundError:
            env[package] = None
    try:
        git = ["git", "-C", str(ROOT)]
        env["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
        env["dirty"] = bool(status.stdout.strip())
    except OSError:
        env["commit"] = None
    return env


def goals(cfg: BenchConfig, results: list[dict]) -> list[dict]:
    """The targets the issue sets, checked on this run (printed, not asserted)."""
    ok = {r["system"]: r for r in results if r["status"] == "ok"}
    out = []

    def goal(text: str, met: bool | None):
        if met is not None:
            out.append({"goal": text, "met": bool(met)})

    dpo, trl = ok.get("ours_dpo"), ok.get("trl_dpo")
    if cfg.workload == "cpu" and dpo:
        goal(
            f"ours_dpo >= 700 tokens/s (got {dpo['tokens_per_s']:.0f})", dpo["tokens_per_s"] >= 700
        )
        goal(
            f"ours_dpo peak RSS <= 1.5 GB (got {dpo['peak_memory_gb']:.2f})",
            dpo["peak_memory_gb"] <= 1.5,
        )
    # Against TRL: 8x on the CPU workload (the CPU issue's target); on the GPU, issue 13's targets.
    want = (
        {"ours_dpo": 8.0}
        if cfg.workload == "cpu"
        else {"ours_dpo": 1.5, "ours_qrpo_precomputed": 2.0}
    )
    for name, times in want.items():
        if name in ok and trl:
            ratio = ok[name]["tokens_per_s"] / trl["tokens_per_s"]
            goal(f"{name} >= {times:g}x trl_dpo tokens/s (got {ratio:.2f}x)", ratio >= times)
    if cfg.workload == "gpu":
        for r in ok.values():
            if r["system"] != "trl_dpo":
                goal(f"{r['system']} MFU >= 40% (got {100 * r['mfu']:.1f}%)", r["mfu"] >= 0.4)
            if trl and r["system"] != "trl_dpo":
                goal(
                    f"{r['system']} peak memory <= trl_dpo's ({r['peak_memory_gb']:.1f} vs "
                    f"{trl['peak_memory_gb']:.1f} GB)",
                    r["peak_memory_gb"] <= trl["peak_memory_gb"],
                )
    pre, ref = ok.get("ours_qrpo_precomputed"), ok.get("ours_qrpo_reference")
    if pre and ref:
        goal(
            f"QRPO precomputed faster than on-the-fly reference "
            f"({pre['tokens_per_s']:.0f} vs {ref['tokens_per_s']:.0f} tokens/s)",
            pre["tokens_per_s"] > ref["tokens_per_s"],
        )
    for r in ok.values():
        if "loop_mfu" in r:
            ratio = r["mfu"] / r["loop_mfu"]
            text = (
                f"{r['system']}: loop-logged MFU agrees with the bench's (bench/loop {ratio:.3f})"
            )
            goal(text, 0.9 <= ratio <= 1.1)
    return out


def table(results: list[dict]) -> str:
    head = "| system | reference | tokens/s | s/step | peak mem GB | MFU | loop MFU | vs TRL |"
    lines = [head, "|" + "---|" * 8]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['system']} | {r['status']}: {r.get('note', '')[:60]} |||||||")
            continue

        def pct(x):
            return f"{100 * x:.1f}%" if x is not None else "-"

        ratio = r.get("ratio_to_trl")
        lines.append(
            f"| {r['system']} | {r['reference']} | {r['tokens_per_s']:.0f} | {r['step_s']:.3f} | "
            f"{r['peak_memory_gb']:.2f} | {pct(r['mfu'])} | {pct(r.get('loop_mfu'))} | "
            f"{f'{ratio:.2f}x' if ratio else '-'} |"
        )
    return "\n".join(lines)


def plot(results: list[dict], path: Path, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r["status"] == "ok"]
    panels = [
        ("tokens/s (after warm-up)", [r["tokens_per_s"] for r in ok], "{:.0f}"),
        ("peak memory (GB)", [r["peak_memory_gb"] for r in ok], "{:.2f}"),
        ("MFU (%)", [100 * r["mfu"] for r in ok], "{:.1f}"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(15, 0.6 * max(len(ok), 1) + 1.6), squeeze=False)
    names = [r["system"] for r in ok]
    colors = ["tab:gray" if n.startswith("trl") else "tab:blue" for n in names]
    for ax, (label, values, fmt) in zip(axes[0], panels):
        bars = ax.barh(names, values, color=colors)
        ax.bar_label(bars, [fmt.format(v) for v in values], padding=3, fontsize=8)
        ax.set_title(label, fontsize=10)
        ax.invert_yaxis()
        ax.margins(x=0.2)
    for ax in axes[0][1:]:
        ax.set_yticklabels([])
    skipped = [f"{r['system']} ({r['status']})" for r in results if r["status"] != "ok"]
    fig.suptitle(title + (f"; not run: {', '.join(skipped)}" if skipped else ""), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        BenchConfig,
        argv,
        prog="python -m train.bench",
        description="Training throughput of our loop against TRL's DPOTrainer.",
    )
    try:
        if cfg.system:
            run_child(cfg)
        else:
            run(cfg)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
