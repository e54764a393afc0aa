"""Training rows from scored reference samples, by regime."""

from __future__ import annotations


def best_worst_pairs(grouped_rows: list[dict]) -> list[dict]:
    """Off-policy pairs: the best and the worst reference sample of each prompt, in the pairs
    format, carrying the prompt's reference rewards; prompts whose samples all tie are skipped."""
    pairs = []
    for row in grouped_rows:
        ranked = sorted(row["responses"], key=lambda r: r["reward"])
        worst, best = ranked[0], ranked[-1]
        if best["reward"] > worst["reward"]:
            ref_rewards = row.get("ref_rewards") or [r["reward"] for r in row["responses"]]
            pairs.append({"prompt": row["prompt"], "chosen": best["text"], "rejected": worst["text"],
                          "score_chosen": best["reward"], "score_rejected": worst["reward"],
                          "ref_rewards": ref_rewards})
    return pairs
