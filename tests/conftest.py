import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

# The settings every test runs under, the library's doctests included (tests/test_doctests.py runs them as
# ordinary tests, so the autouse fixture below applies to them too).
TORCH_THREADS = 1  # tiny test models: a second thread only adds spin-wait
SEED = 0

torch.set_num_threads(TORCH_THREADS)


@pytest.fixture(autouse=True)
def _seed():
    torch.set_num_threads(TORCH_THREADS)  # again per test: a test may have changed it and not put it back
    torch.manual_seed(SEED)
