"""`python -m qrpo.train --config FILE [key=value ...]` (or under `accelerate launch -m qrpo.train`)."""

import sys

from qrpo.common.config import ConfigError, os_error_message, parse_config
from qrpo.common.data import DataError
from qrpo.train.config import TrainConfig
from qrpo.train.preemption import EXIT_PREEMPTED
from qrpo.train.train import TrainingError, train


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        TrainConfig,
        argv,
        prog="python -m qrpo.train",
        description="Train a policy with SFT, QRPO or a baseline.",
    )
    try:
        result = train(cfg)
    except (ConfigError, DataError, TrainingError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except OSError as err:  # a full disk or a read-only output, named; any other: a traceback
        message = os_error_message(err, cfg.run.run_dir)
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
    if result.get("preempted"):
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    main()
