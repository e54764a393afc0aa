"""log Z of the QRPO target per prompt: the paper's closed form and two finite-K forms.

The QRPO target f(q) - beta * log Z is a valid log-ratio of a normalised policy only when
Z = E_{y ~ pi_ref}[exp(f(q_hat(y)) / beta)] for the quantile q_hat as it is actually estimated.
docs/partition.md derives the three forms offered here; in short, with K the number of valid
reference rewards of a row (after ref_mask and exclude_index):

- closed_form: q_hat ~ Uniform(0, 1), the K -> infinity limit: Z_f(beta) = int_0^1 exp(f(q)/beta) dq
  (qrpo.kernels.qrpo.log_partition; the paper's Table 4).
- finite_k: a completion exchangeable with the K reference rewards (continuous rewards, or ties
  broken at random) has its rank uniform on {0, ..., K}, so q_hat is uniform on the grid j/K:
      Z_K(beta) = 1/(K+1) * sum_{j=0}^{K} exp(f(j/K) / beta)
  with f clamped exactly as the loss clamps it (log and normal icdf: q >= 1/K, normal icdf also
  q <= (K-1)/K), so the q = 0 point enters as f(1/K) rather than exp(-inf) = 0.
- empirical: Z computed from the row's own reference rewards, for discrete rewards with ties
  (inclusive and midrank estimators):
    * rows whose completion is one of its prompt's reference completions (exclude_index >= 0, the
      `exclude_self` layout): the mean of exp(f(q_hat_i)/beta) over the prompt's reference
      completions i, each scored against the others exactly as the loss scores a row. Without ties
      this equals Z_K; with ties its expectation over reference sets is the exact E[exp(f/beta)].
    * other rows: a fresh draw from the empirical distribution of the K reference rewards, scored
      against all K (ties with itself count, as they do when a reference completion is trained on
      without exclusion): 1/K * sum_k exp(f(q_hat(r_k)) / beta).

Everything is float64 torch on the tensors' device, vectorised over rows with a static bound on K
(no host sync): finite_k is O(B * K) work, empirical O(B * K log K) (a sort per row).
"""

from __future__ import annotations

import torch
from torch import Tensor

from qrpo.kernels.qrpo import apply_transform, log_partition, reference_validity

PARTITIONS = ("closed_form", "finite_k", "empirical")
EMPIRICAL_ESTIMATORS = ("inclusive", "midrank")


def log_partition_finite_k(
    transform: str, beta: Tensor, k_valid: Tensor, k_max: int, sigma: Tensor | None = None
) -> Tensor:
    """log Z_K(beta) = log(1/(K+1) sum_{j=0}^{K} exp(f(j/K)/beta)) per row, in float64.

    Args:
        transform: one of qrpo.kernels.qrpo.TRANSFORMS.
        beta: [B] float64.
        k_valid: [B] number of valid reference rewards of each row (K; float or int).
        k_max: a static upper bound on K (the width of ref_rewards), so no host sync is needed.
        sigma: [B] scale of `scaled_normal_icdf`.
    """
    k = k_valid.to(torch.float64)[:, None]  # [B, 1]
    j = torch.arange(k_max + 1, dtype=torch.float64, device=beta.device)[None, :]  # [1, K+1]
    s = None if sigma is None else sigma.to(torch.float64)[:, None]
    fq = apply_transform(j / k, k, transform, s)  # the loss's own clamps at j = 0 and j = K
    logits = (fq / beta.to(torch.float64)[:, None]).masked_fill(j > k, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.log1p(k[:, 0])


def log_partition_empirical(
    transform: str,
    beta: Tensor,
    ref_rewards: Tensor,
    ref_mask: Tensor | None,
    exclude_index: Tensor | None,
    estimator: str,
    sigma: Tensor | None = None,
) -> Tensor:
    """log Z from each row's own reference rewards (see the module docstring), in float64.

    The candidate draws are the row's reference rewards allowed by ref_mask. When the row's
    excluded column is one of them, the completion is that reference completion: each candidate
    is scored against the others (K = #candidates - 1, as the loss scores the row). Otherwise each
    candidate is scored against all candidates, itself included (K = #candidates).
    """
    if estimator not in EMPIRICAL_ESTIMATORS:
        raise ValueError(
            f"partition='empirical' needs estimator in {EMPIRICAL_ESTIMATORS}, got {estimator!r}: "
            "the randomized estimator breaks ties, so use partition='finite_k'"
        )
    b, width = ref_rewards.shape
    in_set = reference_validity(ref_rewards, ref_mask, None)
    # Sorting with absent entries at +inf counts, for each candidate, the candidates below it and
    # those tied with it (itself included) by binary search: O(K log K) per row, no [B, K, K].
    values = ref_rewards.detach().to(torch.float64).masked_fill(~in_set, float("inf"))
    ordered = values.sort(dim=1).values
    less = torch.searchsorted(ordered, values, right=False).to(torch.float64)
    equal = torch.searchsorted(ordered, values, right=True).to(torch.float64) - less
    n = in_set.sum(1).to(torch.float64)  # [B] candidates
    if exclude_index is None:
        self_in_set = torch.zeros(b, dtype=torch.bool, device=ref_rewards.device)
    else:
        col = exclude_index.long().clamp(0, width - 1)[:, None]
        self_in_set = (exclude_index >= 0) & in_set.gather(1, col)[:, 0]
    drop = self_in_set.to(torch.float64)
    equal = equal - drop[:, None]  # a candidate is not its own reference in the exclusion layout
    k = (n - drop)[:, None]
    count = less + equal if estimator == "inclusive" else less + 0.5 * equal
    s = None if sigma is None else sigma.to(torch.float64)[:, None]
    fq = apply_transform(count / k, k, transform, s)
    logits = (fq / beta.to(torch.float64)[:, None]).masked_fill(~in_set, float("-inf"))
    return torch.logsumexp(logits, dim=1) - torch.log(n)


def row_log_partition(
    partition: str,
    transform: str,
    beta: Tensor,
    *,
    sigma: Tensor | None,
    ref_rewards: Tensor,
    ref_mask: Tensor | None,
    exclude_index: Tensor | None,
    estimator: str,
) -> Tensor:
    """log Z of each row [B] (float64) under `partition`; beta and sigma are [B] tensors."""
    if partition == "closed_form":
        return log_partition(transform, beta, sigma)
    if partition == "finite_k":
        k_valid = reference_validity(ref_rewards, ref_mask, exclude_index).sum(1)
        return log_partition_finite_k(transform, beta, k_valid, ref_rewards.shape[1], sigma)
    if partition == "empirical":
        return log_partition_empirical(
            transform, beta, ref_rewards, ref_mask, exclude_index, estimator, sigma
        )
    raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
