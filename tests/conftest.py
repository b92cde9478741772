"""Fixtures the test modules share."""

import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second torch thread only adds contention. A module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
