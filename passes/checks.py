"""Post-conditions of the passes (torch.fx pass-infra style ``ensures``), checked on every compile.

They are cheap (no tensor math beyond a shape probe) and turn a broken graph into an error at the pass that
broke it, naming the block, instead of a wrong number three passes later.

Example:
    >>> import torch
    >>> from lwcompile.passes.trace import trace
    >>> from lwcompile.passes.partition import partition
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.Tanh())
    >>> gm = trace(m, (torch.randn(4, 3),)).graph_module
    >>> ensures_partition(gm, partition(gm, (torch.randn(4, 3),)))
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.fx as fx

from lwcompile.errors import PartitionError
from lwcompile.ir import Block
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.transfer import TRANSFERS


def ensures_partition(gm: fx.GraphModule, part) -> None:
    """Blocks have unique names, disjoint trainable parameters, known op/transfer kinds, and the linear op
    maps the recorded input shape to the recorded output shape."""
    names, owned = set(), {}
    nodes = {n.name for n in gm.graph.nodes}
    for b in part.blocks:
        if b.name in names:
            raise PartitionError(f"partition produced two blocks named {b.name!r}")
        names.add(b.name)
        if b.op not in LINEAR_OPS or b.transfer not in TRANSFERS:
            raise PartitionError(f"block {b.name!r}: unknown op {b.op!r} or transfer {b.transfer!r}")
        if b.node not in nodes or (b.transfer_node and b.transfer_node not in nodes):
            raise PartitionError(f"block {b.name!r}: its node is not in the graph")
        for p in b.params:  # by tensor, so a weight tied under two names counts once
            t = id(gm.get_parameter(p))
            if t in owned:
                raise PartitionError(f"parameter {p!r} belongs to blocks {owned[t]!r} and {b.name!r}")
            owned[t] = b.name
        _check_shapes(b)
    # one entry per tensor: a tied weight must get its other uses' gradient once, not once per name
    tensors = [id(gm.get_parameter(n)) for n in part.nonblock]
    if len(set(tensors)) != len(tensors):
        raise PartitionError(f"partition listed a non-block tensor twice under different names: {part.nonblock}")


def _check_shapes(b: Block) -> None:
    with torch.device("meta"):
        x = torch.empty(b.input_shape)
        w = torch.empty(b.weight_shape)
        bias = torch.empty(b.bias_shape) if b.bias_shape is not None else None
        z = LINEAR_OPS[b.op].apply(x, w, bias, dict(b.attrs))
    if tuple(z.shape) != tuple(b.output_shape):
        raise PartitionError(f"block {b.name!r}: op {b.op} maps {b.input_shape} to {tuple(z.shape)}, but the model "
                             f"produced {b.output_shape}; its attributes {dict(b.attrs)} were read wrong")


def ensures_tap(tapped: fx.GraphModule, blocks: Sequence[Block]) -> None:
    """The tapped graph is well formed and returns (output, x, â, [ŷ]) for every block."""
    tapped.graph.lint()
    out = next(n for n in tapped.graph.nodes if n.op == "output").args[0]
    expected = 1 + sum(3 if b.transfer_node else 2 for b in blocks)
    if len(out) != expected:
        raise PartitionError(f"tap pass returned {len(out)} values, expected {expected}")
