"""torch.profiler over a window of optimizer steps: `run.profile_steps=[FIRST, LAST]` writes the
top operators by device time (CPU time without CUDA) of steps FIRST..LAST to
RUN_DIR/profile_rank{R}.txt. Off by default; the window costs profiler overhead only."""

from __future__ import annotations

from pathlib import Path

import torch


class StepProfiler:
    def __init__(self, steps: list[int], run_dir: Path, rank: int, rows: int = 40):
        self.first, self.last = (steps[0], steps[1]) if steps else (0, -1)
        self.path = Path(run_dir) / f"profile_rank{rank}.txt"
        self.rows = rows
        self.profile = None

    def before_step(self, step: int) -> None:
        """Called with the number of the step about to run (1-based)."""
        if step == self.first and self.profile is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if torch.cuda.is_available():
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.profile = torch.profiler.profile(activities=activities)
            self.profile.__enter__()

    def after_step(self, step: int) -> None:
        if self.profile is not None and step >= self.last:
            self.stop()

    def stop(self) -> None:
        if self.profile is None:
            return
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.profile.__exit__(None, None, None)
        cuda = torch.cuda.is_available()
        table = self.profile.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total",
            row_limit=self.rows,
            max_name_column_width=70,
        )
        self.path.write_text(f"steps {self.first}..{self.last}\n{table}\n")
        self.profile = None
