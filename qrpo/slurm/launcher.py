"""`python -m qrpo.slurm.launcher ARGS`: `accelerate launch ARGS` that outlives the preemption signal.

SLURM delivers the preemption signal (SIGUSR2) to every process of a job step, and the node's
task forwards it to its whole child tree. The training processes turn it into a checkpoint; the
launcher (torch elastic's agent) does not handle SIGUSR2, so its default action would kill it
and orphan the workers. Here it gets a no-op handler instead. A Python handler, unlike SIG_IGN,
is reset by exec, so the workers start with the default action until the training loop installs
its own.
"""

import os
import signal
import sys


def main() -> None:
    name = "SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")
    signal.signal(getattr(signal, name), lambda signum, frame: None)
    from accelerate.commands.launch import main as accelerate_launch

    sys.argv = ["accelerate launch", *sys.argv[1:]]
    accelerate_launch()


if __name__ == "__main__":
    main()
