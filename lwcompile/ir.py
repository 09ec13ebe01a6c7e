"""Plain records passed between passes and the runtime.

A :class:`Block` is one (linear transform, transfer function) pair found in the model. It is data only:
the math that belongs to its ``op`` lives in :mod:`lwcompile.passes.linear_ops`, the math of its
``transfer`` in :mod:`lwcompile.passes.transfer`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Block:
    """One block m: â = op(x; W, b), ŷ = f(â).

    name:            unique, human-readable (module path or weight name), used as the key everywhere.
    node:            name of the linear node in the traced graph.
    op:              linear-op kind: "linear", "matmul" (x @ W), "conv1d|2d|3d", "conv_transpose1d|2d|3d".
    attrs:           the op's static arguments (stride, padding, ...) as sorted (key, value) pairs.
    transfer:        transfer-function name ("identity", "relu", "tanh", ...).
    transfer_kwargs: its options as sorted (key, value) pairs (negative_slope, beta, dim, ...).
    weight, bias:    fully-qualified parameter names in the user's model (bias may be None).
    weight_shape, bias_shape: parameter shapes.
    input_shape, output_shape: shapes of x and â for the example inputs (batch dimension included).
    flops_per_example: forward FLOPs of the linear op for one example (2 · multiply-adds).
    transfer_node:   name of the transfer node in the traced graph (None for identity).
    dtype_bytes:     bytes per element of the weight.
    input_node:      name of the node that feeds the linear op its input x.
    frozen:          block parameters with ``requires_grad=False``: used by the inner loop, never changed.
    """

    name: str
    node: str
    op: str
    attrs: tuple[tuple[str, Any], ...]
    transfer: str
    transfer_kwargs: tuple[tuple[str, Any], ...]
    weight: str
    bias: str | None
    weight_shape: tuple[int, ...]
    bias_shape: tuple[int, ...] | None
    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    flops_per_example: int
    transfer_node: str | None = None
    dtype_bytes: int = 4
    input_node: str | None = None
    frozen: tuple[str, ...] = ()

    @property
    def params(self) -> tuple[str, ...]:
        """Parameter names of the block, weight first."""
        return (self.weight,) if self.bias is None else (self.weight, self.bias)

    @property
    def param_bytes(self) -> int:
        n = numel(self.weight_shape) + (numel(self.bias_shape) if self.bias_shape else 0)
        return n * self.dtype_bytes

    @property
    def activation_bytes(self) -> int:
        """Bytes of one batch of block input plus target (what an inner loop reads)."""
        return (numel(self.input_shape) + numel(self.output_shape)) * self.dtype_bytes

    @property
    def batch(self) -> int:
        return self.input_shape[0] if self.input_shape else 1

    def inner_flops(self, steps: int, batch: int | None = None) -> int:
        """FLOPs of `steps` inner iterations: each is one forward (z = Wx) and one weight gradient."""
        b = self.batch if batch is None else batch
        return 2 * steps * self.flops_per_example * b


@dataclass(frozen=True)
class TraceResult:
    """What the trace pass returns: a plain GraphModule sharing the user's parameters, and how it was made."""

    graph_module: Any  # torch.fx.GraphModule
    frontend: str  # "torch.fx.symbolic_trace" | "torch.export"
    in_spec: Any = None  # pytree spec of the inputs (torch.export), None for symbolic tracing
    out_spec: Any = None
    notes: tuple[str, ...] = field(default_factory=tuple)


MUTATED_PREFIX = "new__"  # exported graphs: output "new__X" is the value input X holds after the graph ran


def numel(shape) -> int:
    """Number of elements of a tensor of this shape (1 for a scalar)."""
    n = 1
    for s in shape or ():
        n *= int(s)
    return n


def as_tuple(v: Any) -> tuple:
    """A batch's inputs (or labels) as a tuple: a lone tensor becomes a 1-tuple."""
    return tuple(v) if isinstance(v, (tuple, list)) else (v,)
