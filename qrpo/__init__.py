"""QRPO toolkit: Quantile Reward Policy Optimization and its baselines, one import root.

Parts, imported one way (each may import those to its left):
common <- kernels <- {train, generate, evaluate} <- slurm <- pipelines.
"""
