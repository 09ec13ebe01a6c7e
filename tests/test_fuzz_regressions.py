"""Minimal reproductions of compiler bugs found by the property-based identity test (test_fuzz_identity.py).

Each one failed on the main it was found on and is checked against the same oracle: one compiled T=1 GD step
equals one float64 torch.optim.SGD(lr=ηγ) step (or a clean LwcompileError naming the module).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from fuzz_extras import LearnedScale
from test_fuzz_identity import check_identity


@pytest.mark.parametrize("frontend", ["fx", "export"])
@pytest.mark.parametrize("layer", ["linear", "conv2d"])
def test_a_parametrized_bias_is_no_block_and_the_step_is_sgds(layer, frontend):
    """Found by the fuzzer: ``register_parametrization(module, "bias", ...)`` on an nn.Linear / nn.ConvNd crashed
    the fx front end's partition with a raw ``AttributeError: `bias` is not an nn.Parameter`` (only the weight was
    checked for a parametrization). The layer reads a computed bias: no block, its parameters go to the outer
    optimizer, and the step is SGD's."""
    torch.manual_seed(0)
    if layer == "linear":
        first, x = nn.Linear(4, 5), torch.randn(6, 4, dtype=torch.float64)
        model = nn.Sequential(first, nn.Tanh(), nn.Linear(5, 3))
    else:
        first, x = nn.Conv2d(2, 3, 3), torch.randn(6, 2, 5, 5, dtype=torch.float64)
        model = nn.Sequential(first, nn.Tanh(), nn.Flatten(), nn.Linear(27, 3))
    parametrize.register_parametrization(first, "bias", LearnedScale())
    model = model.double()
    y = torch.randn(6, 3, dtype=torch.float64)
    assert check_identity(model, (x,), y, F.mse_loss, "md_post", frontend) == "ok"
