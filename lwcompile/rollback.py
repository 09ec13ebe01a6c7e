"""Atomic steps: a snapshot of everything a training step may change, and putting it back.

A step writes block weights, BatchNorm-style buffers, the inner optimizers' state, the outer optimizer (which
moves parameters in place) and the step counter. :func:`snapshot` copies them before the step; if anything
raises, :func:`restore` makes the model and the program exactly as they were.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> snap = snapshot(m, {}, None, 0)
    >>> with torch.no_grad():
    ...     _ = m.weight.add_(1.0)
    >>> _ = restore(m, snap)
    >>> bool(torch.equal(m.weight, snap.params["weight"]))
    True
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch import nn


@dataclass(frozen=True)
class Snapshot:
    params: Mapping[str, torch.Tensor]
    buffers: Mapping[str, torch.Tensor]
    inner_state: Mapping[str, tuple]
    outer: Any  # the outer optimizer object (or None)
    outer_state: Any  # a deep copy of its state_dict
    step_count: int


def snapshot(module: nn.Module, inner_state: Mapping[str, tuple], outer: Any, step_count: int) -> Snapshot:
    """Copies of ``module``'s trainable parameters and buffers (what a step may write: a frozen parameter never
    moves), the inner state table, the outer optimizer's state."""
    return Snapshot({n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad},
                    {n: b.detach().clone() for n, b in module.named_buffers()}, dict(inner_state), outer,
                    copy.deepcopy(outer.state_dict()) if outer is not None else None, step_count)


def restore(module: nn.Module, snap: Snapshot) -> tuple[dict[str, tuple], Any, int]:
    """Write the snapshot back into ``module``; returns (inner state, outer optimizer, step count) to reinstate."""
    with torch.no_grad():
        for n, p in module.named_parameters():
            if n in snap.params:
                p.copy_(snap.params[n])
        for n, b in module.named_buffers():
            if n in snap.buffers:
                b.copy_(snap.buffers[n])
    if snap.outer is not None:
        snap.outer.load_state_dict(snap.outer_state)
    return dict(snap.inner_state), snap.outer, snap.step_count
