"""Reward functions for the generate tests, importable as `reward.fn=gen_helpers:NAME` (this
folder is on sys.path under pytest, and put on PYTHONPATH for subprocesses)."""

import time


def length_score(completion: str) -> float:
    """Varied rewards from the tiny random model's gibberish: its length modulo 7."""
    return (len(completion) % 7) / 6


def length_reward(rows, completions, cfg) -> list[list[float]]:
    return [[length_score(c) for c in cs] for cs in completions]


def slow_reward(rows, completions, cfg) -> list[list[float]]:
    """The same, slowly (0.15 s per completion): a shard then runs long enough to be killed
    between chunks."""
    time.sleep(0.15 * sum(len(cs) for cs in completions))
    return length_reward(rows, completions, cfg)
