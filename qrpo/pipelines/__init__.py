"""Whole pipelines over the other packages: the top of the import order.

demo.py      `python -m qrpo.pipelines.demo`: tiny task -> SFT reference -> reference data -> QRPO and
             DPO -> evaluation, in under a minute on CPU
frontier.py  `python -m qrpo.pipelines.frontier`: reward-KL frontiers over beta grids and seeds, locally
             or as one SLURM array
"""
