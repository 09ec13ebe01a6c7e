"""Atomic steps: a journal of everything a training step changed, and putting it back.

A step writes block weights, BatchNorm-style buffers, the inner optimizers' state, the outer optimizer (which
moves parameters in place) and the step counter. Copying all of it before every step costs a pass over every
weight; instead the :class:`Journal` records the *old* objects as the step replaces them, so a step that
succeeds pays (almost) nothing extra:

- buffers: cloned up front (the target graph updates running statistics in place; they are small);
- block weights: the new value goes into a fresh tensor that replaces ``param.data``; the old data is kept by
  reference (the same Parameter object, so optimizers, guards and the graphs still see it);
- inner optimizer state: the state table's tuples are replaced, never written, so the old tuples are kept;
- outer optimizer: only the parameters it steps and its per-parameter slots are cloned, right before it steps.

:meth:`Journal.undo` puts everything back bitwise.

Example:
    >>> import torch
    >>> m = torch.nn.Linear(2, 2)
    >>> before = m.weight.detach().clone()
    >>> j = Journal(m, {}, None, 0)
    >>> j.replace(m.weight, torch.zeros(2, 2))
    >>> _ = j.undo()
    >>> bool(torch.equal(m.weight, before))
    True
"""
from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import nn


class Journal:
    """What one step changed, to undo it exactly (see the module docstring)."""

    def __init__(self, module: nn.Module, inner_state: Mapping[str, tuple], outer: Any, step_count: int) -> None:
        self.module = module
        self.buffers = [(b, b.detach().clone()) for b in module.buffers()]
        self.inner_state, self.outer, self.step_count = dict(inner_state), outer, step_count
        self.swapped: list[tuple[torch.Tensor, torch.Tensor]] = []  # (parameter, its old data)
        self.outer_params: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.stepped: Any = None  # the outer optimizer that stepped (a re-trace may have made a new one)
        self.outer_slots: dict[Any, dict[str, tuple[Any, Any]]] = {}

    def replace(self, param: torch.Tensor, value: torch.Tensor) -> None:
        """Give ``param`` the new ``value`` (copied into a fresh tensor of the parameter's layout, so it aliases
        nothing the step produced), keeping the old data for :meth:`undo`."""
        with torch.no_grad():
            new = torch.empty_like(param).copy_(value)
        self.swapped.append((param, param.data))
        param.data = new

    def before_outer_step(self, outer: Any, params: Mapping[str, torch.Tensor]) -> None:
        """Clone what ``outer`` (an :class:`~lwcompile.outer.OuterOptimizer`) is about to write: ``params``
        (name -> tensor) and its slots. A slot tensor is restored *in place* (an optimizer made by a re-trace
        shares its predecessor's slot tensors, so both get their values back)."""
        self.stepped = outer
        self.outer_params = [(p, p.detach().clone()) for p in params.values()]
        self.outer_slots = {p: {k: (v, v.clone() if isinstance(v, torch.Tensor) else None) for k, v in s.items()}
                            for p, s in outer.optimizer.state.items()}

    def undo(self) -> tuple[dict[str, tuple], Any, int]:
        """Put everything back; returns (inner state, outer optimizer, step count) to reinstate."""
        with torch.no_grad():
            for p, old in self.outer_params:
                p.copy_(old)
            if self.stepped is not None:
                opt = self.stepped.optimizer
                opt.state.clear()
                for p, slots in self.outer_slots.items():
                    for v, old in slots.values():
                        if old is not None:
                            v.copy_(old)
                    opt.state[p] = {k: v for k, (v, _) in slots.items()}
                opt.zero_grad(set_to_none=True)
            for p, old in reversed(self.swapped):  # after the outer params: a tied weight gets its pre-step data
                p.data = old
            for b, old in self.buffers:
                b.copy_(old)
        return dict(self.inner_state), self.outer, self.step_count
