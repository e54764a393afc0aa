"""`python -m slurm train_config=FILE nodes=N gpus_per_node=G ...`: a multi-node sbatch script.

Writes an sbatch script that starts one `accelerate launch` per node (machine rank from
SLURM_NODEID, the allocation's first node as rendezvous host) and prints it; `sbatch FILE`
submits it. (The submitit launcher with preemption and requeue is `slurm/` work in progress.)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.config import ConfigError, doc, parse_config


@dataclass
class SlurmConfig:
    train_config: str = doc("", "training YAML (python -m train --config ...)")
    overrides: list = doc([], "extra key=value overrides for the training run")
    accelerate_config: str = doc("configs/accelerate/fsdp2_multi_node.yaml", "accelerate config")
    nodes: int = doc(1, "nodes")
    gpus_per_node: int = doc(8, "GPUs (processes) per node")
    partition: str = doc("", "SLURM partition ('' for the cluster default)")
    time: str = doc("24:00:00", "time limit")
    job_name: str = doc("qrpo-train", "job name")
    port: int = doc(29500, "rendezvous port on the first node")
    out: str = doc("runs/slurm/train.sbatch", "where to write the script")

    def __post_init__(self):
        if not self.train_config:
            raise ConfigError("train_config must name a training YAML")
        if self.nodes < 1 or self.gpus_per_node < 1:
            raise ConfigError("nodes and gpus_per_node must be >= 1")


def sbatch_script(cfg: SlurmConfig) -> str:
    partition = f"#SBATCH --partition={cfg.partition}\n" if cfg.partition else ""
    overrides = " ".join(cfg.overrides)
    return f"""#!/bin/bash
#SBATCH --job-name={cfg.job_name}
#SBATCH --nodes={cfg.nodes}
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node={cfg.gpus_per_node}
#SBATCH --time={cfg.time}
{partition}#SBATCH --output=%x-%j.out
set -euo pipefail
head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
srun bash -c 'accelerate launch --config_file {cfg.accelerate_config} \\
  --num_machines {cfg.nodes} --num_processes {cfg.nodes * cfg.gpus_per_node} \\
  --machine_rank $SLURM_NODEID --main_process_ip '"$head_node"' --main_process_port {cfg.port} \\
  -m train --config {cfg.train_config} {overrides}'
"""


def main(argv: list[str] | None = None) -> None:
    cfg = parse_config(
        SlurmConfig,
        argv,
        prog="python -m slurm",
        description="Write a multi-node sbatch script for a training run.",
    )
    script = sbatch_script(cfg)
    path = Path(cfg.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(script)
    print(script)
    print(f"wrote {path}; submit with: sbatch {path}")


if __name__ == "__main__":
    main()
