"""Supervised fine-tuning: negative log-likelihood of the completion tokens."""

from torch import Tensor

from qrpo.train.losses.common import as_float
from qrpo.train.losses.spec import Algorithm, LossInputs, register_algorithm


def sft_loss(logps: Tensor, num_tokens: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
    """Summed negative log-likelihood per sequence.

        loss_i = -log pi(y_i | x_i) = -sum_t log pi(y_i,t | x_i, y_i,<t)

    Reduction (the one exception to "mean over examples"): the trainer divides the summed loss
    by the token count, sum_i loss_i / sum_i num_tokens_i (over the global batch when it
    accumulates or shards), which is the usual token-mean cross-entropy.

    Args:
        logps: [B] summed completion log-probs under the policy.
        num_tokens: [B] completion token counts.

    Returns:
        loss [B] (summed NLL per sequence) and metrics: "sft/nll_per_token" (scalar, this
        batch's token-mean NLL) and "sft/num_tokens" (scalar).
    """
    loss = -as_float(logps)
    n = num_tokens.detach().to(loss.dtype)
    metrics = {
        "sft/nll_per_token": loss.detach().sum() / n.sum().clamp(min=1.0),
        "sft/num_tokens": n.sum(),
    }
    return loss, metrics


def _sft(x: LossInputs, cfg) -> tuple[Tensor, dict[str, Tensor]]:
    return sft_loss(x.logps, x.batch.num_tokens)


def chosen_or_every_completion(row: dict, seq, cfg) -> list[list]:
    """SFT imitates the chosen completion of a pair row, and every completion of a grouped row."""
    comps = row["completions"]
    use = [comps[row["chosen"]]] if row["chosen"] >= 0 else comps
    return [[seq(c)] for c in use]


register_algorithm(
    Algorithm(
        "sft",
        _sft,
        needs_reference=False,
        build=chosen_or_every_completion,
        token_mean=True,
        fused_head=True,
    )
)
