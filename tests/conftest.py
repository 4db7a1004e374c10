"""Suite-wide set-up for running the tests side by side (``make test`` runs them on two pytest-xdist
workers, fed one test at a time).

The networks of these tests are small: two intra-op threads run one of them only 1.2x faster than
one thread, while two processes of one thread each run two of them in about the time of one
(measured: BYOL at the learning tests' scale, 4 epochs: 29.3 s with 2 threads, 35.5 s with 1, and
two 1-thread runs side by side 37.3 s). So every xdist worker, and every process a test launches
from it, computes with one thread.
"""

import os

import pytest
import torch


def _is_xdist_worker() -> bool:
    return "PYTEST_XDIST_WORKER" in os.environ


if _is_xdist_worker():
    torch.set_num_threads(1)
    # Inherited by the `selfsup train` processes and DDP launches that tests start.
    os.environ["OMP_NUM_THREADS"] = "1"


def _expected_seconds(item: pytest.Item) -> float:
    """A learning test's ``slow(seconds=...)`` (60 unless given); 0 for every other test."""
    marker = item.get_closest_marker("slow")
    return 0.0 if marker is None else float(marker.kwargs.get("seconds", 60))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Longest first: the learning tests in order of their expected time, then the rest in their
    usual order. Fed one at a time (``--dist load --maxschedchunk 1``), the two workers start on
    the longest tests and end on the short ones, which fill the gaps."""
    items.sort(key=lambda item: -_expected_seconds(item))
