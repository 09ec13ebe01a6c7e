"""Run something on a model and put its state back: buffers (BatchNorm statistics) and the RNG.

Passes that run the model on example inputs (shape propagation, the in-place analysis, the reproduction check)
must leave no trace on it, and must not advance the user's random streams.

Example:
    >>> import torch
    >>> bn = torch.nn.BatchNorm1d(2)
    >>> with preserved_state(bn):
    ...     _ = bn(torch.randn(4, 2) + 5)
    >>> bn.running_mean
    tensor([0., 0.])
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


@contextlib.contextmanager
def preserved_state(model: nn.Module) -> Iterator[None]:
    """Run something on the model, then put back its buffers (BatchNorm statistics) and the RNG."""
    saved = {k: v.detach().clone() for k, v in model.state_dict(keep_vars=True).items()
             if not isinstance(v, nn.Parameter)}
    with torch.random.fork_rng(devices=[]):
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in model.state_dict(keep_vars=True).items():
                    if k in saved:
                        v.copy_(saved[k])
