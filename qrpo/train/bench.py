"""Training throughput: our loop against TRL's DPOTrainer on one workload, in one invocation.

    python -m qrpo.train.bench                                  # CPU: 256-d Llama, V=32000, fp32, ~5 min
    python -m qrpo.train.bench workload=gpu                     # GPU: Llama-3.2-1B-like, bf16, 1k tokens
    python -m qrpo.train.bench steps=10 systems=[ours_dpo,trl_dpo] out=runs/bench_x
    python -m qrpo.train.bench --help                           # every key

Systems (`systems=[...]`), each run in its own subprocess so that peak memory is its own:

    ours_dpo               our loop, DPO, reference model on the fly (like TRL's default)
    ours_dpo_precomputed   our loop, DPO on precomputed reference log-probs (not run by default)
    ours_qrpo_precomputed  our loop, QRPO (pairs as 2 pointwise samples), precomputed reference
    ours_qrpo_reference    our loop, QRPO, reference model on the fly
    trl_dpo                trl.DPOTrainer, gradient checkpointing off, otherwise its defaults
                           (its reference model runs on the fly); skipped when trl is missing
    trl_dpo_precomputed    the same with precompute_ref_log_probs=True: TRL's reference
                           log-probs in one untimed pass before training (the peer of ours_*_precomputed)

TRL 1.16 already computes its log-probs from the LM head in tiles (its own Triton kernel), so
both sides run without full logits. Hub kernels are off on both sides (`use_kernels=False`):
what is timed is the code each project ships, not layers downloaded at load. `padding_free` is
a no-op in TRL's DPO, and Liger's fused loss is refused there, so these two rows are TRL's fastest
documented setups that run without flash-attn.

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
attention mask). The headline is the median step's tokens/s (robust to a run's few slow steps, which
a long run makes rare); the total over all measured steps is beside it, and the goals use the
median against the fastest TRL row. MFU = tokens/s * FLOP/token / peak, with `qrpo.common.flops.train_flops_per_token`
(6N, plus 2N with an on-the-fly reference) and a matmul peak measured on this device in the
compute dtype before any system runs (`qrpo.common.flops.measure_peak_tflops`, best of three); our
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
import shutil
import subprocess
import sys
import time
from pathlib import Path

from qrpo.common.config import ConfigError, parse_config, save_config
from qrpo.common.constants import SOURCE_ROOT
from qrpo.train.bench_report import (
    StepClock,
    fastest_trl,
    goals,
    is_trl,
    plot,
    table,
    throughput,
)
from qrpo.train.bench_workload import (
    OUR_SYSTEMS,
    BenchConfig,
    prepare,
    resolve,
    system_train_config,
)


def run_ours(cfg: BenchConfig, system: str, meta: dict) -> dict:
    from qrpo.train.train import train

    work, sys_dir = Path(cfg.out) / "work", Path(cfg.out) / "systems" / system
    run_dir = sys_dir / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a leftover checkpoint would resume
    tcfg = system_train_config(cfg, system, work, run_dir)
    with StepClock() as clock:
        train(tcfg)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    tokens = [round(r["tokens_per_s"] * r["step_s"]) for r in records]
    on_the_fly = OUR_SYSTEMS[system][1] == "model"
    out = {
        "reference": "on the fly" if on_the_fly else "precomputed",
        "flops_per_token": meta["flops_per_token"]["with_reference" if on_the_fly else "policy"],
        **throughput(clock.stamps, tokens, cfg.warmup),
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

    from qrpo.common.flops import peak_memory_gb

    meta = json.loads((Path(cfg.out) / "work" / "meta.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if is_trl(cfg.system):
        from qrpo.train.bench_trl import run_trl

        result = run_trl(cfg, meta, cfg.system)
    else:
        result = run_ours(cfg, cfg.system, meta)
    result["peak_memory_gb"] = peak_memory_gb(device)
    flops_per_s = result["flops_per_token"] / (meta["peak_tflops"] * 1e12)
    result["mfu"] = result["tokens_per_s"] * flops_per_s
    result["median_mfu"] = result["median_step_tokens_per_s"] * flops_per_s
    path = Path(cfg.out) / "systems" / cfg.system / "result.json"
    path.write_text(json.dumps({"system": cfg.system, "status": "ok", **result}, indent=1))


# --------------------------------------------------------------------------- parent


def _child(config_file: Path, system: str, log: Path, timeout: int) -> int:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SOURCE_ROOT), env.get("PYTHONPATH")]))
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    log.parent.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable,
        "-m",
        "qrpo.train.bench",
        "--config",
        str(config_file),
        f"system={system}",
    ]
    with log.open("w") as f:
        try:
            return subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=SOURCE_ROOT, timeout=timeout
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
        if is_trl(system) and not _have("trl"):
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

    trl = fastest_trl(results)
    for r in results:
        if r["status"] == "ok" and trl is not None:
            r["ratio_to_trl"] = r["median_step_tokens_per_s"] / trl["median_step_tokens_per_s"]
            r["trl_peer"] = trl["system"]
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
        git = ["git", "-C", str(SOURCE_ROOT)]
        env["commit"] = subprocess.run(
            [*git, "rev-parse", "HEAD"], capture_output=True, text=True
        ).stdout.strip()
        status = subprocess.run([*git, "status", "--porcelain"], capture_output=True, text=True)
        env["dirty"] = bool(status.stdout.strip())
    except OSError:
        env["commit"] = None
    return env


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        BenchConfig,
        argv,
        prog="python -m qrpo.train.bench",
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
