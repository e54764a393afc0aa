"""Step 5, `python -m qrpo.generate.merge`: one file from a step's shards, complete or nothing.

    python -m qrpo.generate.merge out=runs/gen                        # the step before merge in steps
    python -m qrpo.generate.merge out=runs/gen merge.step=sample merge.output=samples.jsonl
    python -m qrpo.generate.merge out=runs/gen merge.allow_partial=true

Before writing, every shard of the step must be finished, every chunk its plan lists must be
there, and every prompt id and completion id must occur exactly once (checked against the plans
and manifests; see qrpo.generate.shards.collect). Otherwise it names each missing shard, missing
chunk, missing prompt and duplicated id, and writes nothing, unless `merge.allow_partial=true`:
then it writes what there is (each duplicated prompt once) and says what is missing. Rows are in
source order whatever the sharding, so one shard and many give the same file. The output is
Parquet (through `datasets`) or JSONL, by its suffix, written atomically, by one merge at a
time: a second merge into the same output refuses, naming the first (OUTPUT.lock).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from qrpo.common.data import write_jsonl
from qrpo.common.run_lock import hold_file
from qrpo.generate.runner import cli, exit_on_error
from qrpo.generate.shards import (
    ShardError,
    collect,
    format_summary,
    row_stats,
    shard_name,
    write_rows_parquet,
)


class MergeError(ShardError):
    """The shards are incomplete or inconsistent; nothing was written."""


def merged_step(cfg) -> str:
    """merge.step, or the step before merge in `steps` (the last step when merge is not there)."""
    if cfg.merge.step:
        return cfg.merge.step
    steps = [s for s in cfg.steps if s != "merge"]
    if "merge" in cfg.steps:
        steps = [s for s in cfg.steps[: cfg.steps.index("merge")]] or steps
    if not steps:
        raise MergeError("nothing to merge: give merge.step=STEP")
    return steps[-1]


def merge(cfg, log=print) -> Path:
    """Check and combine the shards of one step into `merge.output`; returns its path."""
    step = merged_step(cfg)
    step_dir = Path(cfg.out) / step
    output = Path(cfg.merge.output or Path(cfg.out) / f"{step}.parquet")
    if output.suffix not in (".parquet", ".jsonl"):
        raise MergeError(f"merge.output={output}: use a .parquet or .jsonl name")
    # One merge per output at a time (OUTPUT.lock beside it): the last array tasks to finish
    # may both see every shard done; pipeline.run_pipeline lets the second one skip.
    with hold_file(output, "merge.output"):
        return _merge(cfg, step, step_dir, output, log)


def _merge(cfg, step: str, step_dir: Path, output: Path, log) -> Path:
    # The shard count: given, or the SLURM array's, or read from the folder names.
    num_shards = cfg.num_shards or int(os.environ.get("SLURM_ARRAY_TASK_COUNT", 0))
    got = collect(step_dir, num_shards)
    if got.num_shards > 1:
        for s, summary in sorted(got.summaries.items()):
            log(format_summary(f"{step} {shard_name(s, got.num_shards)}", summary))
    if got.problems:
        listing = "\n  ".join(got.problems[:50])
        more = f"\n  ... and {len(got.problems) - 50} more" if len(got.problems) > 50 else ""
        if not cfg.merge.allow_partial:
            raise MergeError(
                f"{step_dir}: {len(got.problems)} problem(s), nothing written:\n  {listing}{more}\n"
                "Rerun the missing shards (a rerun resumes), or pass merge.allow_partial=true."
            )
        log(
            f"warning: writing a partial result despite {len(got.problems)} problem(s):\n  {listing}{more}"
        )
    output.parent.mkdir(parents=True, exist_ok=True)
    if output.suffix == ".jsonl":
        write_jsonl(got.rows, output)
    else:
        write_rows_parquet(got.rows, output)
    log(
        format_summary(f"merged {step}, {got.num_shards} shard(s) -> {output}", row_stats(got.rows))
    )
    return output


def main(argv: list[str] | None = None) -> None:
    cli("merge", argv, __doc__, merge)


if __name__ == "__main__":
    exit_on_error(main, sys.argv[1:])
