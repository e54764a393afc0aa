"""Preemption and time limits: a signal sets a flag; processes agree at a step boundary.

SLURM (through submitit's `--signal=USR2@...`) signals before a job is stopped. A collective save
cannot run inside a signal handler, and the signal may reach only some processes, so the handler
only sets a flag; after each optimizer step every process all-reduces the flag (max), and if any
saw the signal, all of them save one complete checkpoint together and leave the loop. The
launcher then requeues the job and the rerun resumes from that checkpoint.
"""

from __future__ import annotations

import signal

import torch

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again later"; the launchers requeue on it


class PreemptionFlag:
    def __init__(self, signal_names: list[str]):
        self.raised = False
        self._previous = {}
        for name in signal_names:
            sig = getattr(signal, name)
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def agreed(self, accelerator) -> bool:
        """True on every process if any process saw the signal (one small all-reduce)."""
        if accelerator.num_processes == 1:
            return self.raised
        flag = torch.tensor(float(self.raised), device=accelerator.device)
        return bool(accelerator.reduce(flag, reduction="sum").item() > 0)

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
