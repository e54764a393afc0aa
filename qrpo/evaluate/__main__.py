"""`python -m evaluate models=[REF_DIR,RUN_DIR,...] prompts=FILE`: compare policies with their
reference on held-out prompts (rewards, win rates, LC reward, lengths, KL, length bias; JSON,
Markdown, PNG). See evaluate/evaluate.py for the commands and outputs.
"""

from __future__ import annotations

import sys

from common.config import exit_on_error, parse_config
from evaluate.evaluate import EvalConfig, evaluate

__all__ = ["EvalConfig", "evaluate", "main"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        EvalConfig,
        argv,
        prog="python -m evaluate",
        description="Compare policies with their reference (the first model) on held-out prompts.",
    )
    evaluate(cfg)


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
