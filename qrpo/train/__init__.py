"""A lean Accelerate training loop for SFT, QRPO and the baselines (see train/train.py)."""
