"""Reference data for QRPO: the task's files, reference samples, rewards, training rows, and
reference log-probs; sharded, resumable and idempotent (see qrpo/generate/pipeline.py)."""
