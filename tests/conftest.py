"""Fixtures the test modules share, and how the suite shares the machine's cores."""

import os

import pytest
import torch


def pytest_configure(config):
    # `make test` runs pytest-xdist workers; torch's default of one thread per core in each of them would
    # oversubscribe the cores, so each worker gets its share
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    # the end-to-end runs and the few tests marked slow take most of the suite's time: collected first, their
    # files start on the workers before the short ones, which then fill in (a stable sort keeps each file's order)
    items.sort(key=lambda item: (item.get_closest_marker("e2e") is None, item.get_closest_marker("slow") is None))


@pytest.fixture(scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second torch thread only adds contention. A module
    asks for it with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def grad_of(model, name: str) -> torch.Tensor:
    """A crosscoder weight's gradient in the weight's public shape: ``W_enc`` is a view of the parameter
    ``W_enc_rows [F, 2, d]``, which is where its gradient lands."""
    if name == "W_enc":
        return model.W_enc_rows.grad.permute(1, 2, 0)
    return getattr(model, name).grad
