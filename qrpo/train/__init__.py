"""A lean Accelerate training loop for SFT, QRPO and the baselines (see qrpo/train/train.py)."""
