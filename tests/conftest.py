"""Fixtures shared by several test modules."""

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: extra OpenMP threads only add synchronisation (10x slower on a busy
    2-core machine), so a module that asks for this runs torch on one thread."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
