"""Gradient reachability: which parameters and graph values the model output's gradient reaches.

Eager PyTorch gives no gradient (``p.grad is None``) to a parameter used only under ``torch.no_grad()``, after
``.detach()``, or not at all, and ``torch.optim`` then leaves it exactly where it is (no weight decay, no
momentum). The compiled step must do the same, so the passes ask autograd itself rather than guess from the
graph's shape: one forward and one backward of a *probe loss* (a fixed random weighting of every
differentiable output) on the example inputs. A ``None`` gradient is structural (no path in the autograd
graph), so it does not depend on the probe's weights; a zero gradient (a dead ReLU) still counts as reached.

Example:
    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.a = torch.nn.Linear(3, 3); self.b = torch.nn.Linear(3, 2)
    ...     def forward(self, x):
    ...         return self.b(self.a(x).detach())
    >>> r = reach(torch.fx.symbolic_trace(M()), (torch.randn(4, 3),))
    >>> r.dead_params, "a" in r.dead_nodes, "b" in r.dead_nodes
    (('a.weight', 'a.bias'), True, False)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from lwcompile.passes.state import preserved_state


def probe_loss(output: Any) -> torch.Tensor | None:
    """A fixed random weighting of every differentiable floating-point leaf of ``output`` (None: there is none).
    The generator is private and seeded, so two runs (eager and traced) weight the same outputs the same."""
    leaves = [t for t in pytree.tree_leaves(output)
              if isinstance(t, torch.Tensor) and t.is_floating_point() and t.requires_grad]
    if not leaves:
        return None
    g = torch.Generator().manual_seed(0)
    total = None
    for t in leaves:
        w = torch.randn(t.shape, generator=g, dtype=t.dtype).to(t.device)
        term = (t * w).sum()
        total = term if total is None else total + term
    return total


def output_grads(run: Callable[[], Any], wrt: Sequence[torch.Tensor]) -> tuple[torch.Tensor | None, ...]:
    """Gradients of :func:`probe_loss` of ``run()`` with respect to ``wrt`` (None where no path reaches one).
    ``run`` is called with grad mode on; preserving buffers and the RNG is the caller's job."""
    with torch.enable_grad():
        loss = probe_loss(run())
        if loss is None:
            return tuple(None for _ in wrt)
        return torch.autograd.grad(loss, list(wrt), allow_unused=True)


@dataclass(frozen=True)
class Reach:
    """What the output's gradient does not reach in a traced graph."""

    dead_params: tuple[str, ...]  # trainable parameters (first name of each tensor) that get no gradient
    dead_nodes: frozenset[str]  # nodes whose tensor value gets no gradient (e.g. a block under no_grad)


class _Keep(fx.Interpreter):
    """Runs the graph and keeps every node's value (the backward below asks for their gradients)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm, garbage_collect_values=False)


def reach(gm: fx.GraphModule, example_inputs: tuple) -> Reach:
    """Parameters and node values of ``gm`` that the gradient of its output never reaches (buffers and RNG are
    restored after the run). A graph whose backward cannot run here is reported as fully reached, i.e. the
    passes behave as if this check did not exist; the target graph's own trace reports that failure."""
    named = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
    interp = _Keep(gm)
    try:
        with preserved_state(gm), torch.enable_grad():
            out = interp.run(*pytree.tree_leaves(example_inputs))
            values = [(n.name, v) for n, v in interp.env.items()
                      if n.op != "output" and isinstance(v, torch.Tensor) and v.requires_grad]
            grads = output_grads(lambda: out, [p for _, p in named] + [v for _, v in values])
    except RuntimeError:
        return Reach((), frozenset())
    g_params, g_nodes = grads[:len(named)], grads[len(named):]
    dead_nodes = {n.name for n in gm.graph.nodes if n.op not in ("output", "placeholder", "get_attr")}
    dead_nodes -= {name for (name, _), g in zip(values, g_nodes) if g is not None}
    return Reach(tuple(n for (n, _), g in zip(named, g_params) if g is None), frozenset(dead_nodes))
