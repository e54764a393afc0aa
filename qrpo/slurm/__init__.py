"""SLURM launchers (submitit): multi-node training with preemption and requeue, sweeps as job
arrays, and generation shards as an array plus a dependent merge.

    python -m qrpo.slurm.train --config TRAIN.yaml nodes=4 gpus_per_node=8 partition=gpu
    python -m qrpo.slurm.generate --config GEN.yaml num_shards=16 gpus_per_node=1
"""
