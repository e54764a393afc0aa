"""`python -m qrpo.slurm [train] ...` is `python -m qrpo.slurm.train ...`; `python -m qrpo.slurm generate ...` is
`python -m qrpo.slurm.generate ...`.

    python -m qrpo.slurm --config configs/train/qrpo_gpu.yaml nodes=4 gpus_per_node=8 partition=gpu
    python -m qrpo.slurm generate --config gen.yaml num_shards=16
"""

import sys


def main() -> None:
    args = sys.argv[1:]
    if args[:1] == ["generate"]:
        from qrpo.slurm.generate import main as run

        args = args[1:]
    else:
        from qrpo.slurm.train import main as run

        args = args[1:] if args[:1] == ["train"] else args
    run(args)


if __name__ == "__main__":
    main()
