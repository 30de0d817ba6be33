"""Quant tests use small tensors: run them single-threaded.

Intra-op threads buy nothing at these sizes, and on a shared 2-core machine a parallel region
that waits for a descheduled thread turns a millisecond op into tens of milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True)
def _single_thread() -> Iterator[None]:
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
