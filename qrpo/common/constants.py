from pathlib import Path

IGNORE_INDEX = -100
"""Target value for tokens that are not scored (prompt, padding, a sequence's last position)."""

SOURCE_ROOT = Path(__file__).resolve().parents[2]
"""The folder that holds the `qrpo` package: the checkout (with configs/ beside it) in an
editable install or a run from the repository. Subprocesses get it on PYTHONPATH."""
