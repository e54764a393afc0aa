"""Shared set-up of the generate tests: one CPU thread, and config builders."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_thread():
    # Two OpenMP threads on two busy cores spin against each other (10-100x slower); one
    # thread keeps the tiny model's timings stable whatever else the machine runs.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
