"""Example labels for PyTorch's standard task losses, so a program exports without a training step.

The target graph is traced for the labels' shapes and dtypes, so an export needs example labels. For the losses
below they follow from the model's output (one forward on the example inputs, buffers and RNG put back):

- MSE, L1, SmoothL1, Huber, BCE, BCE-with-logits (functional or module form): floats shaped like the output;
- CrossEntropy, NLL: class indices (int64) shaped like the output without its class dimension (dim 1, or dim 0
  for an unbatched output).

Any other loss returns None; the caller then asks for ``example_labels``. Label *values* never matter (only shapes
and dtypes are traced): they are zeros, a valid class index and a valid BCE probability.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(4, 3)
    >>> [t.shape for t in infer_example_labels(m, (torch.randn(5, 4),), torch.nn.CrossEntropyLoss())]
    [torch.Size([5])]
    >>> infer_example_labels(m, (torch.randn(5, 4),), torch.nn.functional.mse_loss)[0].dtype
    torch.float32
    >>> infer_example_labels(m, (torch.randn(5, 4),), lambda out, y: (out - y).abs().sum()) is None
    True
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.passes.state import preserved_state

_FLOAT_FUNCTIONS = (F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.huber_loss, F.binary_cross_entropy,
                    F.binary_cross_entropy_with_logits)
_FLOAT_MODULES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)
_INDEX_FUNCTIONS = (F.cross_entropy, F.nll_loss)
_INDEX_MODULES = (nn.CrossEntropyLoss, nn.NLLLoss)


def label_kind(loss_fn: Callable[..., Any]) -> str | None:
    """"float" (output-shaped floats), "index" (class indices) or None (unknown loss).
    ``functools.partial`` wrappers (e.g. ``partial(F.cross_entropy, label_smoothing=0.1)``) are looked through."""
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    if isinstance(loss_fn, _FLOAT_MODULES) or any(loss_fn is f for f in _FLOAT_FUNCTIONS):
        return "float"
    if isinstance(loss_fn, _INDEX_MODULES) or any(loss_fn is f for f in _INDEX_FUNCTIONS):
        return "index"
    return None


def labels_for_output(kind: str, out: torch.Tensor) -> torch.Tensor:
    """Zero labels of ``kind`` ("float" or "index") for a model output ``out``."""
    if kind == "float":
        return torch.zeros(out.shape, dtype=out.dtype)
    shape = () if out.dim() <= 1 else (out.shape[0], *out.shape[2:])  # drop the class dimension
    return torch.zeros(shape, dtype=torch.int64)


def infer_example_labels(model: nn.Module, example_inputs: tuple, loss_fn: Callable[..., Any]
                         ) -> tuple[torch.Tensor] | None:
    """Example labels for ``loss_fn`` and the model's output on ``example_inputs``, or None when the loss is not
    one of the standard losses above or the model does not return one tensor."""
    kind = label_kind(loss_fn)
    if kind is None:
        return None
    with preserved_state(model), torch.no_grad():  # a forward for the output's shape; BatchNorm stats put back
        out = model(*example_inputs)
    if not isinstance(out, torch.Tensor):
        return None
    return (labels_for_output(kind, out),)
