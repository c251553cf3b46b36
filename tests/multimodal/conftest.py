"""Composed-model tests run on one intra-op thread: the tiny towers and LM are faster that way,
and it keeps timings stable when other tests share the cores."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
