"""`python -m slurm train|generate ...`: the same as `python -m slurm.train|slurm.generate ...`."""

import sys

USAGE = """usage: python -m slurm train    --config TRAIN.yaml [overrides] nodes=N gpus_per_node=G ...
       python -m slurm generate --config GEN.yaml [overrides] num_shards=N ...
(`python -m slurm.train --help` and `python -m slurm.generate --help` list every key)"""


def main() -> None:
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("", [])
    if command == "train":
        from slurm.train import main as run
    elif command == "generate":
        from slurm.generate import main as run
    else:
        print(USAGE, file=sys.stderr if command not in ("-h", "--help") else sys.stdout)
        sys.exit(0 if command in ("-h", "--help") else 2)
    run(args)


if __name__ == "__main__":
    main()
