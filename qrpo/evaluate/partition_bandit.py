"""`python -m qrpo.evaluate.partition_bandit`: what each QRPO partition form does to the optimum.

A bandit with 8 arms, a fixed reference policy pi_ref and one reward per arm (distinct, or graded
with ties). For a reference set S of K rewards drawn from pi_ref, every arm a gets the estimated
quantile q_a(S) (the loss's estimator against S), and the QRPO target of every form is the policy

    pi_S(a) = pi_ref(a) * exp(f(q_a(S)) / beta) / Z(S),    Z(S) = sum_a pi_ref(a) exp(f(q_a)/beta)

(the KL-regularised optimum for the reward f(q_S)). A form supplies its own log Z in place of the
unknown Z(S); the policy that minimises the exact expected loss over completions y ~ pi_ref,

    L_S(pi) = sum_a pi_ref(a) * (f(q_a) - beta * log Z_form - beta * log(pi(a) / pi_ref(a)))^2,

equals pi_S only when Z_form = Z(S): otherwise every arm's residual at pi_S is the same
delta(S) = beta * log(Z(S) / Z_form), which a normalised policy cannot absorb. For each form,
estimator and K, the reference sets are enumerated exactly (all multisets of K arms with their
multinomial probabilities; K = 0 stands for the exact reference distribution, q_a = P(R <= r_a)),
L_S is minimised exactly (its stationarity condition, solved with Lambert's W and
checked by autograd and, in the tests, against L-BFGS), and the table reports the expected
total variation TV(pi_fit, pi_S) and the residual delta.

    python -m qrpo.evaluate.partition_bandit                        # identity, beta 0.1, K in 0,2,4,6
    python -m qrpo.evaluate.partition_bandit beta=0.3 transform=log out_dir=runs/bandit_log

Writes out_dir/partition_bandit.md (the table), .json (every figure) and .png (TV against K).
Runs in seconds on a CPU. The derivation is in docs/partition.md.
"""

from __future__ import annotations

import itertools
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from qrpo.common.config import ConfigError, doc, exit_on_error, parse_config
from qrpo.kernels.partition import log_partition_empirical, log_partition_finite_k
from qrpo.kernels.qrpo import apply_transform, log_partition

# The reference policy (decreasing towards the better arms, as a base model that is mostly
# wrong) and the rewards of its 8 arms; only their order matters to the quantiles.
REF_PROBS = (0.22, 0.18, 0.15, 0.12, 0.10, 0.09, 0.08, 0.06)
REWARDS = {
    "distinct": (0.0, 1 / 7, 2 / 7, 3 / 7, 4 / 7, 5 / 7, 6 / 7, 1.0),
    "graded": (0.0, 0.0, 0.0, 0.5, 0.5, 1.0, 1.0, 1.0),  # fail / partial / pass
}
FORMS = ("closed_form", "finite_k", "empirical")
BANDIT_TRANSFORMS = ("identity", "log", "square", "sqrt")  # finite at q = 1 without a clamp


@dataclass
class BanditConfig:
    out_dir: str = doc("runs/partition_bandit", "directory of the table, JSON and plot")
    beta: float = doc(0.1, "KL coefficient", gt=0)
    transform: str = doc("identity", f"f(q): {' | '.join(BANDIT_TRANSFORMS)}")
    ks: list = doc([0, 2, 4, 6], "reference set sizes K, enumerated exactly (0: exact pi_ref)")
    estimators: list = doc(["inclusive", "midrank"], "quantile estimators (deterministic ones)")
    rewards: list = doc(["distinct", "graded"], f"reward variants: {', '.join(REWARDS)}")
    plot: bool = doc(True, "write partition_bandit.png")

    def __post_init__(self):
        if not self.beta > 0:
            raise ConfigError("beta must be > 0")
        if self.transform not in BANDIT_TRANSFORMS:
            raise ConfigError(
                f"transform must be one of {BANDIT_TRANSFORMS}, got '{self.transform}'"
            )
        if any(int(k) < 0 or int(k) > 12 for k in self.ks):
            raise ConfigError("ks must lie in 0..12 (0: the exact reference distribution)")
        for e in self.estimators:
            if e not in ("inclusive", "midrank"):
                raise ConfigError(f"estimators: inclusive | midrank, got '{e}'")
        for r in self.rewards:
            if r not in REWARDS:
                raise ConfigError(f"rewards: one of {tuple(REWARDS)}, got '{r}'")


def reference_sets(k: int) -> tuple[Tensor, Tensor]:
    """All multisets of k arms as counts [n, 8] and their probabilities [n] under pi_ref^k.
    k = 0 stands for the exact reference distribution: one 'set' with counts = pi_ref."""
    p = torch.tensor(REF_PROBS, dtype=torch.float64)
    if k == 0:
        return p[None], torch.ones(1, dtype=torch.float64)
    sets = list(itertools.combinations_with_replacement(range(len(p)), k))
    counts = torch.stack([torch.bincount(torch.tensor(s), minlength=len(p)) for s in sets]).double()
    coef = math.factorial(k) / torch.lgamma(counts + 1.0).exp().prod(1)
    return counts, coef * (p**counts).prod(1)


def arm_quantiles(rewards: Tensor, counts: Tensor, estimator: str) -> Tensor:
    """q [n, 8]: each arm's reward scored against each reference set (weights = counts)."""
    below = (rewards[None, :] < rewards[:, None]).double()  # [arm, ref arm]: ref below arm
    tied = (rewards[None, :] == rewards[:, None]).double()
    less, equal = counts @ below.T, counts @ tied.T
    total = counts.sum(1, keepdim=True)
    return (less + (equal if estimator == "inclusive" else 0.5 * equal)) / total


def form_log_z(
    form: str, cfg: BanditConfig, estimator: str, k: int, counts: Tensor, rewards: Tensor
) -> Tensor:
    """log Z of each reference set [n] under `form`, from the loss's own functions."""
    n = counts.shape[0]
    beta = torch.full((n,), cfg.beta, dtype=torch.float64)
    if form == "closed_form" or (form == "finite_k" and k == 0):  # K = infinity: the limit
        return log_partition(cfg.transform, beta)
    if form == "finite_k":
        return log_partition_finite_k(cfg.transform, beta, torch.full((n,), k), k)
    if k == 0:  # the empirical plug-in with the exact distribution as its "sample"
        q = arm_quantiles(rewards, counts, estimator)
        fq = apply_transform(q, torch.tensor(math.inf), cfg.transform, None)
        return torch.logsumexp(fq / cfg.beta + counts.log(), 1)
    arms = torch.arange(8).repeat(n).repeat_interleave(counts.long().flatten())
    ref_rewards = rewards[arms.reshape(n, k)]  # the K rewards of each set, as the loss sees them
    return log_partition_empirical(cfg.transform, beta, ref_rewards, None, None, estimator)


def expected_loss(theta: Tensor, target: Tensor, beta: float) -> Tensor:
    """L_S for every row: sum_a pi_ref(a) (target_a - beta log(pi_a / pi_ref_a))^2, pi = softmax."""
    log_ref = torch.tensor(REF_PROBS, dtype=torch.float64).log()
    log_ratio = torch.log_softmax(theta, dim=1) - log_ref
    return (log_ref.exp() * (target - beta * log_ratio) ** 2).sum(1)


def lambert_w0(x: Tensor, iterations: int = 8) -> Tensor:
    """Principal branch of Lambert's W (w e^w = x, w >= -1) for x >= -1/e, by Halley's method in
    float64, starting from log1p(x) for x >= 0 and the branch-point series below 0."""
    p = torch.sqrt((2.0 * (math.e * x + 1.0)).clamp(min=0.0))
    w = torch.where(x >= 0, torch.log1p(x.clamp(min=0.0)), -1.0 + p - p * p / 3.0)
    for _ in range(iterations):
        ew = torch.exp(w)
        f = w * ew - x
        denom = ew * (w + 1.0) - (w + 2.0) * f / (2.0 * w + 2.0)
        w = (w - torch.where(denom != 0, f / denom, 0.0)).clamp(min=-1.0)
    return w


def _log_ratios_absorbing(scaled: Tensor, m: Tensor, beta: float, steps: int) -> Tensor:
    """log(pi / pi_ref) [n, 8] at the stationary point where arm m [n, 1] is the free one."""
    w = torch.tensor(REF_PROBS, dtype=torch.float64)
    t_m = scaled.gather(1, m)  # [n, 1]
    others = torch.ones_like(scaled, dtype=torch.bool).scatter(1, m, False)

    def log_ratios(l_m: Tensor) -> Tensor:
        s = beta * (t_m - l_m) * torch.exp(-l_m)
        x = torch.maximum(s * scaled.exp() / beta, torch.tensor(-1.0 / math.e))
        return torch.where(others, scaled - lambert_w0(x), l_m)

    lo = t_m - 60.0  # s huge: every other arm's mass vanishes, so the total is < 1
    hi = torch.maximum(-w.log()[m] + 1e-9, lo)  # arm m alone holds mass >= 1
    for _ in range(steps):  # the bracket starts >= 60 wide: 2^-64 of it is below 1e-17
        mid = 0.5 * (lo + hi)
        short = (w * log_ratios(mid).exp()).sum(1, keepdim=True) < 1.0
        lo, hi = torch.where(short, mid, lo), torch.where(short, hi, mid)
    return log_ratios(0.5 * (lo + hi))


def fit_policies(target: Tensor, beta: float, steps: int = 64) -> tuple[Tensor, Tensor]:
    """argmin over policies of L_S for every row of target [n, 8], from its stationarity condition.

    With w = pi_ref, l = log(pi / pi_ref) and rho = target - beta * l, the gradient of L_S in
    the softmax logits vanishes where w_c rho_c = pi_c * sum_a w_a rho_a, i.e. rho_c = s * e^{l_c}
    for one scalar s per row (s has the sign of delta). So target_c = beta * l_c + s * e^{l_c}:

        l_c(s) = target_c / beta - W(s * e^{target_c / beta} / beta)     (Lambert's W)

    Every arm but one, m, is on W's principal branch; l_m is the unknown, s = (target_m -
    beta * l_m) e^{-l_m}, and l_m is the root of sum_c pi_ref(c) e^{l_c} = 1 (bisection). When
    delta > 0 that root is unique whatever m. When delta < 0, l_m may pass W's branch point: arm
    m then takes up the missing mass, and L_S has a local minimum for each choice of m; the three
    arms with the largest target mass pi_ref e^{target/beta} are tried and the lowest loss kept.
    Returns the policies [n, 8] and each row's largest |gradient| of L_S in the logits by
    autograd (~0: stationary); the tests compare the result with a generic optimiser.
    """
    w = torch.tensor(REF_PROBS, dtype=torch.float64)
    scaled = target / beta
    n, tries = len(target), 3
    m = (scaled + w.log()).topk(tries, dim=1).indices.T.reshape(-1, 1)  # candidates, [3n, 1]
    theta = w.log() + _log_ratios_absorbing(scaled.repeat(tries, 1), m, beta, steps)
    loss = expected_loss(theta, target.repeat(tries, 1), beta).reshape(tries, n)
    best = loss.argmin(0)
    best_theta = theta.reshape(tries, n, -1)[best, torch.arange(n)]
    theta = best_theta.clone().requires_grad_()
    expected_loss(theta, target, beta).sum().backward()
    return torch.softmax(theta.detach(), 1), theta.grad.abs().amax(1)


def run_case(cfg: BanditConfig, variant: str, estimator: str, k: int) -> list[dict]:
    rewards = torch.tensor(REWARDS[variant], dtype=torch.float64)
    counts, prob = reference_sets(k)
    q = arm_quantiles(rewards, counts, estimator)
    k_rows = torch.tensor(math.inf if k == 0 else float(k))
    fq = apply_transform(q, k_rows, cfg.transform, None)
    log_ref = torch.tensor(REF_PROBS, dtype=torch.float64).log()
    log_z_exact = torch.logsumexp(log_ref + fq / cfg.beta, 1)  # Z(S), the target's normaliser
    pi_target = torch.softmax(log_ref + fq / cfg.beta, 1)
    log_z = torch.stack([form_log_z(f, cfg, estimator, k, counts, rewards) for f in FORMS])
    targets = (fq[None] - cfg.beta * log_z[:, :, None]).reshape(-1, fq.shape[1])
    pi_fit, grad = fit_policies(targets, cfg.beta)  # every form's sets at once: [3n, 8]
    pi_fit, grad = pi_fit.reshape(len(FORMS), *fq.shape), grad.reshape(len(FORMS), -1)
    out = []
    for i, form in enumerate(FORMS):
        delta = cfg.beta * (log_z_exact - log_z[i])  # each arm's residual at pi_target
        tv = 0.5 * (pi_fit[i] - pi_target).abs().sum(1)
        out.append(
            dict(
                rewards=variant, estimator=estimator, k=k, form=form,
                tv_mean=float((prob * tv).sum()), tv_max=float(tv.max()),
                delta_mean=float((prob * delta).sum()),
                abs_delta_mean=float((prob * delta.abs()).sum()),
                reference_sets=len(prob), max_grad=float(grad[i].max()),
            )
        )  # fmt: skip
    return out


def markdown_table(results: list[dict], cfg: BanditConfig) -> str:
    head = (
        f"QRPO bandit: 8 arms, f = {cfg.transform}, beta = {cfg.beta}; expectations over every "
        "reference set of K draws from pi_ref (K = inf: the exact distribution).\n\n"
        "| rewards | estimator | K | form | E TV(fit, target) | max TV | E delta | E abs(delta) |\n"
        "|---|---|---|---|---|---|---|---|\n"
    )
    lines = [
        f"| {r['rewards']} | {r['estimator']} | {r['k'] or 'inf'} | {r['form']} | "
        f"{r['tv_mean']:.2e} | {r['tv_max']:.2e} | {r['delta_mean']:+.2e} | "
        f"{r['abs_delta_mean']:.2e} |"
        for r in results
    ]
    return head + "\n".join(lines) + "\n"


def plot(results: list[dict], cfg: BanditConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(v, e) for v in cfg.rewards for e in cfg.estimators]
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.2), squeeze=False)
    finite = sorted(int(k) for k in cfg.ks if int(k) > 0)
    for ax, (variant, estimator) in zip(axes[0], panels):
        for i, form in enumerate(FORMS):
            pick = {
                r["k"]: r["tv_mean"]
                for r in results
                if (r["rewards"], r["estimator"], r["form"]) == (variant, estimator, form)
            }
            ax.plot(finite, [pick[k] for k in finite], "o-", color=f"C{i}", label=form)
            if 0 in pick:
                ax.axhline(pick[0], color=f"C{i}", ls=":", lw=1.5)
        ax.set(title=f"{variant}, {estimator}", xlabel="K reference rewards", ylim=(0, None))
    axes[0][0].set_ylabel("E TV(fitted, target)\n(dotted: K = inf)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run(cfg: BanditConfig) -> list[dict]:
    start = time.perf_counter()
    # Thousands of tiny [n, 8] ops: intra-op threads only add contention (20x slower on a busy
    # 2-core machine), so this runs on one thread and restores the setting afterwards.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        results = [
            row
            for variant in cfg.rewards
            for estimator in cfg.estimators
            for k in sorted(int(k) for k in cfg.ks)
            for row in run_case(cfg, variant, estimator, k)
        ]
    finally:
        torch.set_num_threads(threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, cfg)
    (out / "partition_bandit.md").write_text(table)
    payload = {"config": asdict(cfg), "results": results, "seconds": time.perf_counter() - start}
    (out / "partition_bandit.json").write_text(json.dumps(payload, indent=1))
    if cfg.plot:
        plot(results, cfg, out / "partition_bandit.png")
    print(table)
    print(f"wrote {out}/partition_bandit.{{md,json{',png' if cfg.plot else ''}}} "
          f"in {payload['seconds']:.1f} s")  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        BanditConfig,
        argv,
        prog="python -m qrpo.evaluate.partition_bandit",
        description="Exact QRPO optimum on an 8-arm bandit under each partition form.",
    )
    run(cfg)


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
