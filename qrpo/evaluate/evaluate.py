"""Held-out comparison of trained policies with their reference: rewards, win rates, a
length-controlled reward, lengths, KL to the reference and the length bias of the implicit
reward, as JSON, a Markdown table and plots.

    python -m qrpo.evaluate models=[runs/demo/sft,runs/demo/qrpo,runs/demo/dpo] \\
        prompts=runs/demo/data/eval_prompts.jsonl out=runs/demo/eval.json
    python -m qrpo.evaluate models=[REF_DIR,RUN_DIR] reward.fn=model reward.model=RM_DIR
    python -m qrpo.evaluate models=[REF_DIR,RUN_DIR] prompts=problems.jsonl reward.fn=code \\
        n=10 pass_k=[1,5] reward.sandbox.cpu_seconds=1

`models` lists model folders or run folders (a run folder means its `final/` checkpoint); the
first one is the reference that every other model is compared with (its own row is the
baseline: win rate 1/2, KL 0). Every model samples `n` completions per held-out prompt with the
same per-prompt seeds (qrpo.common.sampling), each completion is scored (qrpo.common.rewards, the
registry generate's reward step uses too), and its log-probability
under the model and under the reference is computed from packed sequences with the no-logits
kernel (qrpo.kernels.sequence_model: sequence_logps over SequenceLogprobModel), on the completion
as training sees it: its text re-tokenized, plus EOS (qrpo.common.tokenize). For a sample cut at
max_new_tokens (the share is reported as `at_max_new_tokens`) or one whose text does not
re-tokenize to the sampled tokens, that sequence is not exactly a sample of the policy, and k1
can come out negative; k3 is non-negative per sample.

Written next to `out` (a .json path): `<stem>.md`, `<stem>_samples.jsonl` (every sample with
its reward, length, log-probs and, for code, why it got its reward), `<stem>_reward_kl.png`,
`<stem>_bars.png`, `<stem>_lengths.png`.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from qrpo.common.config import ConfigError, choice, doc, sub
from qrpo.common.data import RowReader, content_hash, read_json_rows
from qrpo.common.model import DTYPES, ModelConfig, load_model, load_tokenizer
from qrpo.common.model_files import check_model_path
from qrpo.common.rewards import RewardConfig, compute_rewards, load_reward
from qrpo.common.run_lock import hold_file
from qrpo.common.sampling import SamplingConfig, sample_completions
from qrpo.common.tiny import TINY_NAME
from qrpo.common.tokenize import encode_completion, encode_prompt
from qrpo.common.writable import check_writable
from qrpo.evaluate import metrics, plots
from qrpo.kernels.logprobs_api import LOGPROB_BACKENDS

LENGTH_UNITS = ("tokens", "words", "chars")


@dataclass
class EvalConfig(SamplingConfig):
    # Evaluate's own defaults for three of the sampling fields (the others are SamplingConfig's).
    n: int = doc(4, "samples per prompt and model")
    max_new_tokens: int = doc(24, "longest completion, in tokens")
    seed: int = doc(1234, "base sampling seed, shared by all models")
    models: list = doc([], "model or run folders (RUN_DIR means RUN_DIR/final); first = reference")
    names: list = doc([], "display names, one per model (default: from the paths)")
    prompts: str = doc("", "JSONL of held-out rows {'prompt': ...}; empty: the embedded task's")
    n_prompts: int = doc(0, "use the first N prompts only (0: all; the embedded task: 32)")
    reward: RewardConfig = sub(RewardConfig, "how completions are scored")
    kl: bool = doc(True, "log-probs under each model and the reference: KL and length bias")
    length_unit: str = choice("tokens", LENGTH_UNITS, "length for the LC reward and the bias")
    pass_k: list = doc([1], "k of pass@k for reward.fn=code (k <= n)")
    dtype: str = choice("float32", tuple(DTYPES), "model weights dtype")
    hub_kernels: bool = doc(False, "hub kernels at load for every model (model.hub_kernels)")
    device: str = doc("auto", "auto (cuda when available) | cpu | cuda | cuda:1 ...")
    kernel_backend: str = choice("auto", LOGPROB_BACKENDS, "log-prob kernel")
    micro_batch_tokens: int = doc(8192, "tokens per packed log-prob batch")
    plots: bool = doc(True, "write the PNG plots")
    out: str = doc("", "results JSON (default: eval.json next to the last model's folder)")

    def __post_init__(self):
        if not self.models:
            raise ConfigError("models must list at least one model folder (the first: reference)")
        if self.names and len(self.names) != len(self.models):
            raise ConfigError(f"names has {len(self.names)} entries for {len(self.models)} models")
        if self.n < 1:
            raise ConfigError("n must be at least 1")
        self.check_sampling()
        if any(not 1 <= int(k) <= self.n for k in self.pass_k):
            raise ConfigError(f"pass_k={list(self.pass_k)}: each k must be in [1, n={self.n}]")


@dataclass
class ModelSamples:
    """Everything measured on one model's samples; lists are [prompt][sample]."""

    name: str
    path: str
    texts: list[list[str]]
    rewards: list[list[float]] = field(default_factory=list)
    details: list[list] = field(default_factory=list)
    tokens: list[list[int]] = field(default_factory=list)  # completion tokens, EOS excluded
    lengths: list[list[float]] = field(default_factory=list)  # in cfg.length_unit
    logps: list[list[float]] | None = None
    ref_logps: list[list[float]] | None = None


# --------------------------------------------------------------------------- inputs


def resolve_model(path: str) -> str:
    """A run folder (with final/) means its final checkpoint."""
    if path != TINY_NAME and (Path(path) / "final" / "config.json").is_file():
        return str(Path(path) / "final")
    return path


def results_path(cfg: EvalConfig) -> Path:
    """`out`, or eval.json next to the last model's folder."""
    last = resolve_model(cfg.models[-1])
    default = Path("runs/eval") if last == TINY_NAME else Path(last).parent
    return Path(cfg.out or default / "eval.json")


def model_names(paths: list[str], names: list[str]) -> list[str]:
    if names:
        return [str(n) for n in names]
    out = []
    for p in paths:
        parts = Path(p).parts
        name = parts[-2] if len(parts) > 1 and parts[-1] == "final" else Path(p).name or p
        out.append(name if name not in out else f"{name}-{len(out)}")
    return out


def load_rows(cfg: EvalConfig) -> list[dict]:
    """The held-out rows, checked as training data is (qrpo.common.rows) before any model
    loads: every row an object with a non-empty prompt (text or messages), and no prompt id
    twice: a repeated prompt would count twice in every mean and win rate."""
    if cfg.prompts:
        path = Path(cfg.prompts)
        if not path.is_file():
            raise ConfigError(f"prompts: file not found: {path}")
        rows = read_json_rows(path)
        seen: dict[str, int] = {}
        for i, row in enumerate(rows):
            reader = RowReader(row, i, str(path))
            prompt, messages = reader.prompt()
            given = row.get("prompt_id")
            if given is not None and (isinstance(given, bool) or not isinstance(given, (str, int))):
                raise reader.error("prompt_id", f"expected a string, got {given!r:.60}")
            # The id training data would give the row: its own, or a hash of the prompt.
            pid = str(given) if given not in (None, "") else content_hash(messages or prompt)
            if pid in seen:
                field = "prompt_id" if given not in (None, "") else "prompt"
                raise reader.error(field, f"duplicate prompt id '{pid}' (first in row {seen[pid]})")
            seen[pid] = i
    else:
        from qrpo.common.tiny import TASK

        rows = [{"prompt": p} for p in TASK.prompts("eval", cfg.n_prompts or 32)]
    rows = rows[: cfg.n_prompts] if cfg.n_prompts else rows
    if not rows:
        raise ConfigError("no held-out prompts")
    return rows


def _device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _length(text: str, tokens: int, unit: str) -> float:
    return float({"tokens": tokens, "words": len(text.split()), "chars": len(text)}[unit])


# --------------------------------------------------------------------------- measurements


def completion_logps(
    model, ref_model, prompt_ids: list[list[int]], completion_ids: list[list[list[int]]], cfg
) -> tuple[list[list[float]], list[list[float]]]:
    """Summed completion log-probs (EOS included) under the model and the reference."""
    from qrpo.common.packing import Example, Sequence
    from qrpo.kernels.sequence_model import SequenceLogprobModel, sequence_logps

    examples = [
        Example([Sequence(prompt_ids[i] + ids, len(prompt_ids[i]), i)])
        for i, per_prompt in enumerate(completion_ids)
        for ids in per_prompt
    ]
    device = next(model.parameters()).device
    out = []
    for m in (model, ref_model):
        wrapped = SequenceLogprobModel(m, cfg.kernel_backend).eval()
        flat = sequence_logps(wrapped, examples, cfg.micro_batch_tokens, device).double().tolist()
        it = iter(flat)
        out.append([[next(it) for _ in per_prompt] for per_prompt in completion_ids])
    return out[0], out[1]


def summarize_model(s: ModelSamples, ref: ModelSamples, fit: metrics.LengthFit, cfg) -> dict:
    flat = [r for rs in s.rewards for r in rs]
    lengths = [n for ns in s.lengths for n in ns]
    means = [metrics.mean(rs) for rs in s.rewards]
    ref_means = [metrics.mean(rs) for rs in ref.rewards]

    def lc_means(x: ModelSamples) -> list[float]:
        return [metrics.mean(fit.controlled(rs, ns)) for rs, ns in zip(x.rewards, x.lengths)]

    sem = math.nan
    if len(means) > 1:
        m = metrics.mean(means)
        sem = math.sqrt(math.fsum((x - m) ** 2 for x in means) / (len(means) - 1) / len(means))
    out = {
        "path": s.path,
        "mean_reward": metrics.mean(flat),
        "reward_sem": sem,
        "win_rate": metrics.win_rate(means, ref_means),
        "pairwise_win_rate": metrics.pairwise_win_rate(s.rewards, ref.rewards),
        "lc_reward": metrics.mean(fit.controlled(flat, lengths)),
        "lc_win_rate": metrics.win_rate(lc_means(s), lc_means(ref)),
        "mean_length": metrics.mean(lengths),
        "mean_tokens": metrics.mean([t for ts in s.tokens for t in ts]),
        "at_max_new_tokens": metrics.mean(
            [float(t >= cfg.max_new_tokens) for ts in s.tokens for t in ts]
        ),
        "kl_k1": None,
        "kl_k3": None,
        "length_bias_spearman": None,
    }
    if s is ref:
        out.update(kl_k1=0.0, kl_k3=0.0)
    elif s.logps is not None:
        lp = [x for xs in s.logps for x in xs]
        rp = [x for xs in s.ref_logps for x in xs]
        out["kl_k1"], out["kl_k3"] = metrics.kl_estimates(lp, rp)
        ratio = [a - b for a, b in zip(lp, rp)]
        out["length_bias_spearman"] = metrics.spearman(lengths, ratio)
    if cfg.reward.fn == "code":
        counts = [(len(ds), sum(d["reward"] == 1.0 for d in ds)) for ds in s.details]
        for k in cfg.pass_k:
            out[f"pass@{int(k)}"] = metrics.mean_pass_at_k(counts, int(k))
        out["statuses"] = dict(Counter(d["status"] for ds in s.details for d in ds))
    return out


# --------------------------------------------------------------------------- outputs


def _clean(x):
    """NaN -> None, recursively (JSON has no NaN)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def _fmt(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def markdown_table(summary: dict[str, dict], cfg: EvalConfig) -> str:
    cols = [
        ("reward", "mean_reward"),
        ("± sem", "reward_sem"),
        ("win rate", "win_rate"),
        ("LC reward", "lc_reward"),
        ("LC win rate", "lc_win_rate"),
        (f"length ({cfg.length_unit})", "mean_length"),
        ("KL k1", "kl_k1"),
        ("KL k3", "kl_k3"),
        ("rho(len, log-ratio)", "length_bias_spearman"),
    ]
    if cfg.reward.fn == "code":
        cols += [(f"pass@{int(k)}", f"pass@{int(k)}") for k in cfg.pass_k]
    lines = [
        "| model | " + " | ".join(c for c, _ in cols) + " |",
        "|---" * (len(cols) + 1) + "|",
    ]
    for name, s in summary.items():
        lines.append(f"| {name} | " + " | ".join(_fmt(s.get(k)) for _, k in cols) + " |")
    return "\n".join(lines) + "\n"


def write_samples(path: Path, rows: list[dict], runs: list[ModelSamples]) -> Path:
    with path.open("w") as f:
        for s in runs:
            for i, row in enumerate(rows):
                for j, text in enumerate(s.texts[i]):
                    rec = {
                        "model": s.name,
                        "prompt_index": i,
                        "prompt": row["prompt"],
                        "sample": j,
                        "completion": text,
                        "reward": s.rewards[i][j],
                        "length": s.lengths[i][j],
                        "tokens": s.tokens[i][j],
                    }
                    if s.logps is not None:
                        rec["logp"], rec["ref_logp"] = s.logps[i][j], s.ref_logps[i][j]
                    if s.details[i][j] is not None:
                        rec["detail"] = s.details[i][j]
                    f.write(json.dumps(_clean(rec)) + "\n")
    return path


# --------------------------------------------------------------------------- main


def evaluate(cfg: EvalConfig) -> dict:
    t0 = time.perf_counter()
    device = _device(cfg.device)
    rows = load_rows(cfg)
    paths = [resolve_model(p) for p in cfg.models]
    names = model_names(list(cfg.models), list(cfg.names))
    out = results_path(cfg)
    # Every model folder (config and weight headers) before the first is loaded: a damaged last
    # model used to fail only after the reference had been sampled and scored.
    for k, path in enumerate(paths):
        check_model_path(f"models[{k}]", path)
    check_writable("out", out.parent)
    # A reward model runs where the policies do unless reward.device says otherwise. It (or the
    # sandbox) loads before the policies: a reward that cannot load stops before any sampling.
    reward_cfg = (
        replace(cfg.reward, device=str(device)) if cfg.reward.device == "auto" else cfg.reward
    )
    load_reward(reward_cfg, rows[0] if rows else None)
    # One evaluation per results file (OUT.lock beside it): two would overwrite each other's
    # JSON and interleave the samples file. Evaluations into other files of the folder run.
    with hold_file(out, "out"):
        return _evaluate(cfg, rows, paths, names, out, reward_cfg, device, t0)


def _evaluate(cfg, rows, paths, names, out: Path, reward_cfg, device, t0: float) -> dict:
    prompts = [r["prompt"] for r in rows]
    ref_tok = load_tokenizer(ModelConfig(name_or_path=paths[0]), key="models[0]")
    prompt_ids = [
        encode_prompt(ref_tok, "" if isinstance(p, list) else p, p if isinstance(p, list) else [])
        for p in prompts
    ]
    runs: list[ModelSamples] = []
    ref_model = None
    for k, (name, path) in enumerate(zip(names, paths)):
        mcfg = ModelConfig(name_or_path=path, dtype=cfg.dtype, hub_kernels=cfg.hub_kernels)
        model = load_model(mcfg, device, log=lambda *_: None, key=f"models[{k}]").to(device)
        model.eval()
        tok = ref_tok if k == 0 else load_tokenizer(mcfg, key=f"models[{k}]")
        if len(tok) != len(ref_tok) or tok.eos_token_id != ref_tok.eos_token_id:
            raise ConfigError(f"{path}: its tokenizer differs from the reference's ({paths[0]})")
        print(f"evaluate: {name} ({path}): sampling {cfg.n} x {len(prompts)} prompts", flush=True)
        texts = sample_completions(model, tok, prompts, **cfg.draw_options())
        s = ModelSamples(name, path, texts)
        scores = compute_rewards(reward_cfg, rows, texts)
        s.rewards, s.details = scores.rewards, scores.details
        ids = [[encode_completion(ref_tok, t) for t in ts] for ts in texts]
        s.tokens = [[len(x) - 1 for x in xs] for xs in ids]
        s.lengths = [
            [_length(t, n, cfg.length_unit) for t, n in zip(ts, ns)]
            for ts, ns in zip(texts, s.tokens)
        ]
        if k == 0:
            ref_model = model
        elif cfg.kl:
            s.logps, s.ref_logps = completion_logps(model, ref_model, prompt_ids, ids, cfg)
        if k > 0:
            del model
        runs.append(s)

    ref = runs[0]
    fit = metrics.fit_length(
        [n for ns in ref.lengths for n in ns], [r for rs in ref.rewards for r in rs]
    )
    summary = {s.name: summarize_model(s, ref, fit, cfg) for s in runs}

    stem = out.with_suffix("")
    files = {
        "json": str(out),
        "markdown": str(stem) + ".md",
        "samples": str(write_samples(Path(str(stem) + "_samples.jsonl"), rows, runs)),
    }
    table = markdown_table(summary, cfg)
    Path(files["markdown"]).write_text(
        f"# Held-out evaluation against {ref.name}\n\n{len(rows)} prompts x {cfg.n} samples, "
        f"reward: {cfg.reward.fn}. LC reward: reward - b*z, z = standardised length "
        f"({cfg.length_unit}) of the reference's samples (b = {fit.b:.4g}). KL from the "
        "model's own samples (k1 = mean log-ratio, k3 = mean(exp(-r) - 1 + r)).\n\n" + table
    )
    if cfg.plots:
        bar_metrics = ["mean_reward", "lc_reward", "win_rate", "pairwise_win_rate"]
        bar_metrics += [f"pass@{int(k)}" for k in cfg.pass_k] if cfg.reward.fn == "code" else []
        files["reward_kl_png"] = str(plots.reward_vs_kl(summary, Path(f"{stem}_reward_kl.png")))
        files["bars_png"] = str(plots.bars(summary, Path(f"{stem}_bars.png"), bar_metrics))
        per_model = {s.name: [n for ns in s.lengths for n in ns] for s in runs}
        files["lengths_png"] = str(
            plots.lengths(per_model, Path(f"{stem}_lengths.png"), cfg.length_unit)
        )
    results = _clean(
        {
            "reference": ref.name,
            "models": summary,
            "length_fit": fit.to_dict(),
            "num_prompts": len(rows),
            "samples_per_prompt": cfg.n,
            "seconds": time.perf_counter() - t0,
            "files": files,
            "config": asdict(cfg),
        }
    )
    out.write_text(json.dumps(results, indent=2))
    print("\n" + table + f"\nevaluate: results in {out} (+ .md, samples, plots)", flush=True)
    return results
