"""Training tests run torch on one thread: on a shared 2-core machine two threads measured several times
slower (each op waits for a preempted thread)."""

import pytest


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
