"""Reward-KL frontiers: every algorithm trained over a grid of beta, for several seeds, each run
evaluated on held-out prompts against the same reference samples.

    python -m qrpo.pipelines.frontier                                  # the embedded default, CPU
    python -m qrpo.pipelines.frontier seeds=[0] only=[qrpo_identity,dpo] out=runs/frontier_small
    python -m qrpo.pipelines.frontier --config configs/frontier/qrpo_k.yaml   # curves from a YAML
    python -m qrpo.pipelines.frontier slurm=true slurm_args=[partition=cpu,gpus_per_node=0,time=30]

Per seed it writes the task data, SFTs the reference (the demo's recipe, qrpo/pipelines/demo.py) and runs
the generate pipeline once per K (reference samples per training prompt): pointwise rows for
QRPO, best/worst pairs for DPO, SimPO, REBEL and KTO. Every run of that seed starts from that
reference and trains on that data. A curve is a name, a training config, a list of overrides, a
list of betas and K; so QRPO at another K, another transform or another partition form is one
more entry of `curves`.

Only beta moves along a curve: the learning rate and the number of epochs stay those of the
curve's config (the demo's), the same budget for every algorithm. Beta is each loss's own
trade-off between reward and staying near the reference; the learning rate would move both at
once. SimPO has no reference term, so its beta does not bound the KL: its points show where
SimPO lands at this budget, not a trade-off it controls.

Evaluation: per seed, the reference and every run not yet evaluated go through one call of
`qrpo.evaluate.evaluate` (same held-out prompts, same per-prompt sampling seeds), so the reference is
sampled once per seed; the SHA-256 of its samples is kept in SEED_DIR/reference_samples.json
and in every run's frontier_eval.json, and a later call whose reference samples differ is an
error. KL is k3 (non-negative per sample) from each run's own samples, LC reward is the
length-controlled reward fitted on the reference's samples.

Outputs (under `out`): frontier.md, frontier.json, frontier.csv (one row per curve x beta,
mean and standard error over seeds), frontier.png (reward and LC reward against KL, one curve
per algorithm, error bars over seeds), seedS/ (data, sft, kK/ reference data, CURVE/betaB/ runs).

Resumable: a run whose final/ and frontier_eval.json exist is skipped; the data, SFT and
generate steps skip what they find done. With `slurm=true` the runs left to train are submitted
as one job array through qrpo.slurm.train (its `cluster=local|debug` run on this machine), and the
evaluation follows here when they end; the per-seed data, SFT and evaluation still run in this
process (small on the embedded task; a large model wants them as jobs of their own).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, fields, replace
from pathlib import Path

from qrpo.common.config import ConfigError, build_config, doc, parse_config
from qrpo.evaluate.frontier_report import beta_text, reference_samples_hash, write_report
from qrpo.kernels.partition import PARTITIONS

QRPO_TINY = "configs/train/qrpo_tiny.yaml"
PAIRS_TINY = "configs/train/dpo_tiny.yaml"
DATA_KINDS = ("pointwise", "pairs")


@dataclass
class CurveConfig:
    """One algorithm's curve: runs at each beta, from one training config and its overrides."""

    name: str = doc("", "label in the table and plot; also the runs' folder name")
    config: str = doc(QRPO_TINY, "training config (YAML) the runs start from")
    data: str = doc("pointwise", "reference data: pointwise (every sample) | pairs (best/worst)")
    betas: list = doc([], "loss.beta of each run (one point of the curve each)", gt=0)
    overrides: list = doc([], "training overrides of every run, e.g. loss.transform=log")
    k: int = doc(0, "reference samples per training prompt (0: the frontier's k)")

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise ConfigError(f"curve name '{self.name}' must be non-empty, without '/'")
        if self.data not in DATA_KINDS:
            raise ConfigError(f"curve {self.name}: data must be one of {DATA_KINDS}")
        if not self.betas or not all(float(b) > 0 for b in self.betas):  # NaN fails
            raise ConfigError(f"curve {self.name}: betas must be a non-empty list of values > 0")
        if self.k < 0:
            raise ConfigError(f"curve {self.name}: k must be >= 0")
        texts = [beta_text(b) for b in self.betas]
        twice = sorted({t for t in texts if texts.count(t) > 1})
        if twice:  # one run folder per beta: a repeat would train the same point twice into it
            raise ConfigError(f"curve {self.name}: beta {', '.join(twice)} is listed twice")


def _curve(name, config, data, betas, *overrides, k=0) -> CurveConfig:
    return CurveConfig(name, config, data, list(betas), list(overrides), k)


# Log-spaced betas, picked in a pilot on the embedded task (1 seed) to run from near the
# reference (KL k3 ~ 0.1) to far from it (KL > 5, where QRPO collapses). Each loss scales beta
# its own way: QRPO's f(q) lies in [0, 1] for identity, about [-2, 2] for normal_icdf; REBEL
# regresses reward differences in [0, 1]; SimPO's margin uses per-token log-probs; DPO's KL
# flattens at large beta (hence the decades); KTO's KL grows with beta here.
QRPO_BETAS = [0.1, 0.3, 1.0, 3.0, 10.0]
DEFAULT_CURVES = [
    _curve("qrpo_identity", QRPO_TINY, "pointwise", QRPO_BETAS),
    _curve(
        "qrpo_normal_icdf",
        QRPO_TINY,
        "pointwise",
        [0.3, 1.0, 3.0, 10.0, 30.0],
        "loss.transform=normal_icdf",
    ),
    _curve("dpo", PAIRS_TINY, "pairs", [0.01, 0.1, 1.0, 10.0, 100.0]),
    _curve("simpo", PAIRS_TINY, "pairs", [0.3, 1.0, 3.0, 10.0, 30.0], "loss.algorithm=simpo"),
    _curve("rebel", PAIRS_TINY, "pairs", [0.03, 0.1, 0.3, 1.0, 3.0], "loss.algorithm=rebel"),
    _curve("kto", PAIRS_TINY, "pairs", [0.01, 0.03, 0.1, 1.0, 3.0], "loss.algorithm=kto"),
]

# QRPO with each partition form (loss.partition) at K = 4 and 16 reference samples per prompt.
PARTITION_CURVES = [
    _curve(
        f"qrpo_{form}_k{k}",
        QRPO_TINY,
        "pointwise",
        QRPO_BETAS,
        f"loss.partition={form}",
        k=k,
    )
    for k in (4, 16)
    for form in PARTITIONS
]


@dataclass
class FrontierConfig:
    out: str = doc("runs/frontier", "folder for data, runs, the table and the plot")
    seeds: list = doc([0, 1, 2], "seeds: task data, SFT, sampling and training per seed")
    k: int = doc(8, "reference samples per training prompt (curves may set their own)")
    n_sft: int = doc(2000, "SFT demonstrations")
    n_train: int = doc(128, "training prompts")
    n_eval: int = doc(64, "held-out prompts")
    eval_n: int = doc(4, "samples per held-out prompt and model")
    sft_epochs: int = doc(6, "SFT epochs over the noisy demonstrations")
    epochs: int = doc(2, "epochs of every run (the same budget for every algorithm)")
    global_batch: int = doc(16, "sequences per step of every run (0: each config's own)")
    curves: list[CurveConfig] = doc(DEFAULT_CURVES, "the curves (name, config, data, betas, ...)")
    only: list = doc([], "train and report only these curves (by name; [] : all)")
    betas: dict = doc({}, "beta grids replacing curves', by name, e.g. betas.dpo=[0.1,1]")
    partition_curves: bool = doc(
        False, "add QRPO with each loss.partition form at K=4 and 16 (needs loss.partition)"
    )
    train_overrides: list = doc(["run.plot=false"], "overrides of every run, before the curve's")
    threads: int = doc(1, "torch CPU threads of this process (0: torch's default)")
    slurm: bool = doc(
        False, "train the runs as one SLURM job array (qrpo.slurm.train), then evaluate"
    )
    slurm_config: str = doc("", "SLURM profile YAML (as qrpo.slurm.train's --slurm-config)")
    slurm_args: list = doc([], "SLURM keys, e.g. [partition=cpu,gpus_per_node=0,time=30]")

    def __post_init__(self):
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError("seeds must be a non-empty list of distinct integers")
        if self.k < 2:
            raise ConfigError("k must be >= 2 (QRPO's quantile needs other reference samples)")
        names = [c.name for c in self.curves]
        if len(set(names)) != len(names):
            raise ConfigError(f"curve names must be distinct: {names}")
        known = set(names) | {c.name for c in PARTITION_CURVES}
        for key, given in [("only", set(self.only)), ("betas", set(self.betas))]:
            if given - known:
                raise ConfigError(f"{key}: no curve named {sorted(given - known)}; curves: {names}")

    def active_curves(self) -> list[CurveConfig]:
        curves = list(self.curves)
        if self.partition_curves:
            from qrpo.train.config import LossConfig

            if "partition" not in {f.name for f in fields(LossConfig)}:
                raise ConfigError(
                    "partition_curves=true needs loss.partition in the training config "
                    "(closed_form | finite_k | empirical), which this version does not have"
                )
            curves += [c for c in PARTITION_CURVES if c.name not in {x.name for x in curves}]
        if self.only:
            curves = [c for c in curves if c.name in self.only]
        return [
            replace(c, betas=list(self.betas[c.name])) if c.name in self.betas else c
            for c in curves
        ]


@dataclass
class RunSpec:
    """One point of one curve for one seed."""

    curve: CurveConfig
    beta: float
    seed: int
    k: int
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.curve.name}/beta{beta_text(self.beta)}"

    @property
    def eval_file(self) -> Path:
        return self.run_dir / "frontier_eval.json"

    def done(self) -> bool:
        return (self.run_dir / "final" / "config.json").is_file() and self.eval_file.is_file()


# --------------------------------------------------------------------------- shared inputs


_T0 = time.perf_counter()


def _log(msg: str) -> None:
    print(f"frontier [{time.perf_counter() - _T0:6.0f} s]: {msg}", flush=True)


def prepare_seed(cfg: FrontierConfig, seed: int, needs: dict[int, set[str]]) -> dict:
    """Task data, the SFT reference and, for each K, the reference data the curves need (K ->
    pointwise and/or pairs), once per seed; what is already there is kept."""
    from qrpo.common.tiny import write_task_data
    from qrpo.generate.config import PipelineConfig
    from qrpo.generate.pipeline import run_pipeline
    from qrpo.train.config import TrainConfig
    from qrpo.train.train import train

    root = Path(cfg.out) / f"seed{seed}"
    files = write_task_data(
        root / "data", n_sft=cfg.n_sft, n_train=cfg.n_train, n_eval=cfg.n_eval, seed=seed
    )
    sft_final = root / "sft" / "final"
    if not (sft_final / "config.json").is_file():
        _log(f"seed {seed}: SFT of the reference")
        overrides = [
            f"data.path={files['sft']}",
            f"run.run_dir={root / 'sft'}",
            f"run.epochs={cfg.sft_epochs}",
            f"run.seed={seed}",
            "run.plot=false",
        ]
        train(build_config(TrainConfig, "configs/train/sft_tiny.yaml", overrides))
    common = [f"model.name_or_path={sft_final}", "chunk_size=64"]
    data = {}
    for k in sorted(needs):
        gen = root / f"k{k}"
        data[k] = {kind: gen / kind / "ref_logps.parquet" for kind in DATA_KINDS}
        rewards = gen / "pointwise" / "reward.parquet"  # the pairs' input
        if not (data[k]["pointwise"].is_file() and rewards.is_file()):
            _log(f"seed {seed}: reference data, {k} samples per training prompt")
            sampled = [
                f"data.path={files['train_prompts']}",
                f"out={gen / 'pointwise'}",
                f"sample.n={k}",
                "sample.max_new_tokens=24",
                f"sample.seed={seed}",
                "reward.fn=task",
                *common,
            ]
            steps = ["build.regime=pointwise", "steps=[sample,reward,build,ref_logps,merge]"]
            run_pipeline(build_config(PipelineConfig, None, [*sampled, *steps]))
            # The same samples with their rewards, merged into one file.
            merge = ["steps=[merge]", "merge.step=reward"]
            run_pipeline(build_config(PipelineConfig, None, [*sampled, *merge]))
        if "pairs" in needs[k] and not data[k]["pairs"].is_file():
            _log(f"seed {seed}: best/worst pairs of the {k} samples per training prompt")
            pair_args = [
                f"data.path={rewards}",
                f"out={gen / 'pairs'}",
                "build.regime=best_worst",
                "steps=[build,ref_logps,merge]",
                *common,
            ]
            run_pipeline(build_config(PipelineConfig, None, pair_args))
    return {"sft": sft_final, "eval_prompts": files["eval_prompts"], "data": data}


def plan(cfg: FrontierConfig, curves: list[CurveConfig]) -> list[RunSpec]:
    specs = []
    for seed in cfg.seeds:
        for curve in curves:
            for beta in curve.betas:
                run_dir = Path(cfg.out) / f"seed{seed}" / curve.name / f"beta{beta_text(beta)}"
                specs.append(RunSpec(curve, float(beta), int(seed), curve.k or cfg.k, run_dir))
    return specs


def train_config(cfg: FrontierConfig, spec: RunSpec, inputs: dict):
    """The run's TrainConfig: the curve's config, the seed's reference and data, its beta."""
    from qrpo.train.config import TrainConfig

    batch = [f"run.global_batch={cfg.global_batch}"] if cfg.global_batch else []
    overrides = [
        f"model.name_or_path={inputs['sft']}",
        f"data.path={inputs['data'][spec.k][spec.curve.data]}",
        f"run.run_dir={spec.run_dir}",
        f"run.epochs={cfg.epochs}",
        f"run.seed={spec.seed}",
        "ref.source=data",
        *batch,
        *cfg.train_overrides,
        *spec.curve.overrides,
        f"loss.beta={spec.beta}",
    ]
    try:
        return build_config(TrainConfig, spec.curve.config, overrides)
    except ConfigError as err:
        raise ConfigError(f"curve {spec.curve.name}, beta {spec.beta:g}: {err}") from None


# --------------------------------------------------------------------------- training


def train_local(cfg: FrontierConfig, todo: list[RunSpec], inputs: dict[int, dict]) -> None:
    from qrpo.train.train import train

    for i, spec in enumerate(todo):
        _log(f"[{i + 1}/{len(todo)}] seed {spec.seed} {spec.name}: training")
        result = train(train_config(cfg, spec, inputs[spec.seed]))
        if result.get("preempted"):
            raise RuntimeError(f"{spec.run_dir}: training was interrupted; rerun to resume")


def train_slurm(cfg: FrontierConfig, todo: list[RunSpec], inputs: dict[int, dict]) -> bool:
    """One job array through qrpo.slurm.train; False for a dry run (nothing to evaluate)."""
    from qrpo.slurm.config import SlurmConfig
    from qrpo.slurm.train import Run, check_runs, submit_runs

    scfg = build_config(SlurmConfig, cfg.slurm_config or None, [*cfg.slurm_args, "wait=true"])
    runs = [Run(f"seed{s.seed}/{s.name}", train_config(cfg, s, inputs[s.seed])) for s in todo]
    check_runs(runs, scfg)
    submit_runs(scfg, cfg.out, runs)
    if scfg.dry_run:
        return False
    failed = [str(s.run_dir) for s in todo if not (s.run_dir / "final" / "config.json").is_file()]
    if failed:
        raise RuntimeError(
            f"{len(failed)} run(s) ended without final/: {failed[:5]}; see "
            f"{Path(cfg.out) / 'slurm'} for their logs"
        )
    return True


# --------------------------------------------------------------------------- evaluation


def evaluate_seed(cfg: FrontierConfig, seed: int, specs: list[RunSpec], inputs: dict) -> None:
    """One evaluate call: the seed's reference, then every run of `specs`."""
    from qrpo.evaluate.evaluate import EvalConfig, evaluate

    root = Path(cfg.out) / f"seed{seed}"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    out = root / "eval" / f"eval_{stamp}.json"
    _log(f"seed {seed}: evaluating the reference and {len(specs)} run(s) -> {out}")
    results = evaluate(
        EvalConfig(
            models=[str(inputs["sft"]), *[str(s.run_dir) for s in specs]],
            names=["reference", *[s.name for s in specs]],
            prompts=str(inputs["eval_prompts"]),
            n=cfg.eval_n,
            plots=False,
            out=str(out),
        )
    )
    samples = Path(results["files"]["samples"])
    digest = reference_samples_hash(samples, "reference")
    record = root / "reference_samples.json"
    if record.is_file():
        first = json.loads(record.read_text())
        if first["sha256"] != digest:
            raise RuntimeError(
                f"seed {seed}: the reference's held-out samples in {samples} differ from those "
                f"of {first['samples_file']} (sha256 {digest[:12]} vs {first['sha256'][:12]}): "
                "sampling is not reproducible here, the runs would not be comparable"
            )
    else:
        record.write_text(json.dumps({"sha256": digest, "samples_file": str(samples)}, indent=2))
    reference = results["models"]["reference"]
    for spec in specs:
        spec.eval_file.write_text(
            json.dumps(
                {
                    "curve": spec.curve.name,
                    "beta": spec.beta,
                    "seed": seed,
                    "k": spec.k,
                    "run_dir": str(spec.run_dir),
                    "metrics": results["models"][spec.name],
                    "reference": reference,
                    "reference_samples_sha256": digest,
                    "eval_file": str(out),
                },
                indent=2,
            )
        )


# --------------------------------------------------------------------------- main


def run(cfg: FrontierConfig) -> dict:
    t0 = time.perf_counter()
    if cfg.threads:
        # The embedded model (2 layers, width 64) is bound by per-op overhead, not FLOPs: a
        # second thread buys little, and on shared cores OpenMP's spin-waiting threads made each
        # step several times slower than one thread does.
        import torch

        torch.set_num_threads(cfg.threads)
    curves = cfg.active_curves()
    specs = plan(cfg, curves)
    needs: dict[int, set[str]] = {}
    for s in specs:
        needs.setdefault(s.k, set()).add(s.curve.data)
    inputs = {seed: prepare_seed(cfg, seed, needs) for seed in cfg.seeds}
    for spec in specs:  # catch a bad curve before hours of training
        train_config(cfg, spec, inputs[spec.seed])
    todo = [s for s in specs if not (s.run_dir / "final" / "config.json").is_file()]
    skipped = sum(s.done() for s in specs)
    _log(f"{len(specs)} runs: {skipped} done, {len(todo)} to train")
    if todo and cfg.slurm:
        if not train_slurm(cfg, todo, inputs):
            return {}
    elif todo:
        train_local(cfg, todo, inputs)
    for seed in cfg.seeds:
        pending = [s for s in specs if s.seed == seed and not s.eval_file.is_file()]
        if pending:
            evaluate_seed(cfg, seed, pending, inputs[seed])
    records = [json.loads(s.eval_file.read_text()) for s in specs]
    report = write_report(records, curves, Path(cfg.out))
    report["seconds"] = time.perf_counter() - t0
    report["runs_trained"] = len(todo)
    report["runs_skipped"] = skipped
    _log(
        f"done in {report['seconds']:.0f} s ({len(todo)} trained, {skipped} skipped): "
        f"{report['files']['markdown']}, {report['files']['png']}"
    )
    return report


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        FrontierConfig,
        argv,
        prog="python -m qrpo.pipelines.frontier",
        description="Reward-KL frontiers: each algorithm over a grid of beta, several seeds.",
    )
    try:
        run(cfg)
    except ConfigError as err:
        print(f"python -m qrpo.pipelines.frontier: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
