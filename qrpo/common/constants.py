IGNORE_INDEX = -100
"""Target value for tokens that are not scored (prompt, padding, a sequence's last position)."""
