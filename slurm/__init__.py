"""SLURM launchers for training and generation."""
