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


def grad_of(model, name: str) -> torch.Tensor:
    """A crosscoder weight's gradient in the weight's public shape: ``W_enc`` is a view of the parameter
    ``W_enc_rows [F, 2, d]``, which is where its gradient lands."""
    if name == "W_enc":
        return model.W_enc_rows.grad.permute(1, 2, 0)
    return getattr(model, name).grad
