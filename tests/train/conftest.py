"""Fixtures of the training tests."""

import pytest

from tests.train.tiny_runs import grouped_rows, pair_rows, write_jsonl


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    return {
        "grouped": write_jsonl(d / "grouped.jsonl", grouped_rows(24, 4)),
        "pairs": write_jsonl(d / "pairs.jsonl", pair_rows(40)),
    }
