"""`python -m qrpo.evaluate models=[REF_DIR,RUN_DIR,...] prompts=FILE`: compare policies with their
reference on held-out prompts (rewards, win rates, LC reward, lengths, KL, length bias; JSON,
Markdown, PNG). See qrpo/evaluate/evaluate.py for the commands and outputs.
"""

from __future__ import annotations

import sys

from qrpo.common.config import exit_on_error, parse_config
from qrpo.common.writable import writing_to
from qrpo.evaluate.evaluate import EvalConfig, evaluate, results_path

__all__ = ["EvalConfig", "console_main", "evaluate", "main"]


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        EvalConfig,
        argv,
        prog="python -m qrpo.evaluate",
        description="Compare policies with their reference (the first model) on held-out prompts.",
    )
    with writing_to(results_path(cfg).parent):  # a full disk names the results folder
        evaluate(cfg)


def console_main() -> None:
    """The console script `qrpo-evaluate`: `main` whose expected failures end in one line, exit 2."""
    exit_on_error(main, sys.argv[1:])


if __name__ == "__main__":
    console_main()
