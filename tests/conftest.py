import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
torch.set_num_threads(1)  # tiny test models: a second thread only adds spin-wait


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
