"""Reward functions for the generate tests, importable as `reward.fn=gen_helpers:NAME` (this
folder is on sys.path under pytest, and put on PYTHONPATH for subprocesses)."""

import time


def length_reward(prompt, completion: str) -> float:
    """Varied rewards from the tiny random model's gibberish: its length modulo 7."""
    return (len(completion) % 7) / 6


def slow_reward(prompt, completion: str) -> float:
    """The same, slowly: a shard then runs long enough to be killed between chunks."""
    time.sleep(0.15)
    return length_reward(prompt, completion)
