"""Lookups the partitioner reads: which graph ops are linear in a weight, which are transfer functions.

Policy as data (STYLE.md): nothing here is a hand-kept copy of an op. The linear-op lookups are computed from the
rows of :mod:`lwcompile.passes.linear_ops`, the transfer ones are views of the rows of
:mod:`lwcompile.passes.transfer`; to teach lwcompile a new op, add a row there. Each op appears in its three FX
spellings: module (symbolic trace), function / tensor method (symbolic trace), and ATen overload (torch.export).
What stays here is policy that is no op's row: which calls transpose a 2-D weight, and which element-wise ops are
*not* transfer functions (the block is then identity, with a warning).

Example:
    >>> import torch
    >>> linear_for_call("call_function", torch.ops.aten.conv2d.padding).name, LINEAR_MODULES[torch.nn.Conv1d]
    ('conv2d', 'conv1d')
    >>> TRANSFER_MODULES[torch.nn.ReLU6]
    'relu6'
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import torch
from torch import nn

from lwcompile.passes.linear_ops import LINEAR_OPS, LinearOpRow
from lwcompile.passes.transfer import (TRANSFER_FUNCTIONS, TRANSFER_METHODS, TRANSFER_MODULES,  # noqa: F401
                                       TRANSFER_OPTIONS)

aten = torch.ops.aten


# ---------------------------------------------------------------- linear ops (computed from linear_ops.LINEAR_OPS)
def _linear_lookup(kind: str, call: str) -> dict:
    return {key: row.name for row in LINEAR_OPS.values() if row.call == call for key in getattr(row, kind)}


LINEAR_MODULES: Mapping[type, str] = MappingProxyType(_linear_lookup("modules", "weight"))
# function -> op kind; arguments follow F.linear / F.convNd / F.conv_transposeNd order.
LINEAR_FUNCTIONS: Mapping[object, str] = MappingProxyType(_linear_lookup("functions", "weight"))
MATMUL_FUNCTIONS = frozenset(_linear_lookup("functions", "matmul"))
MATMUL_METHODS = frozenset(_linear_lookup("methods", "matmul"))


def linear_for_module(mod: nn.Module) -> LinearOpRow | None:
    """The row of a module's class (exact type first, then the first row whose class it subclasses)."""
    name = LINEAR_MODULES.get(type(mod)) or next((v for k, v in LINEAR_MODULES.items() if isinstance(mod, k)), None)
    return None if name is None else LINEAR_OPS[name]


# (FX node op, target) -> op kind, for every call spelling of every row
_LINEAR_CALLS: dict[tuple[str, Any], str] = {
    **{("call_function", fn): row.name for row in LINEAR_OPS.values() for fn in row.functions},
    **{("call_method", m): row.name for row in LINEAR_OPS.values() for m in row.methods}}


def linear_for_call(op: str, target: Any) -> LinearOpRow | None:
    """The row a call node names (``op``: the FX node's op, "call_function" or "call_method"), or None."""
    try:
        name = _LINEAR_CALLS.get((op, target))
    except TypeError:  # an unhashable target
        return None
    return None if name is None else LINEAR_OPS[name]


_SWAP_PAIRS = ([0, 1], [-2, -1], [-1, 0], [-2, 1])  # the axis pairs that swap a 2-D tensor's two axes
# (FX op, target) -> does this call swap the two axes of its (2-D weight) argument?  W.T, W.t(), W.transpose(0, 1), ...
_TRANSPOSES = {
    ("call_function", getattr): lambda n: n.args[1] in ("T", "mT"),
    ("call_method", "t"): lambda n: True,
    ("call_method", "transpose"): lambda n: sorted(n.args[1:3]) in _SWAP_PAIRS,
    ("call_method", "permute"): lambda n: list(n.args[1:]) in ([1, 0], [[1, 0]], [(1, 0)]),
    ("call_function", torch.t): lambda n: True,
    ("call_function", aten.t.default): lambda n: True,
    ("call_function", aten.numpy_T.default): lambda n: True,
    ("call_function", torch.transpose): lambda n: sorted(n.args[1:3]) in _SWAP_PAIRS,
    ("call_function", aten.transpose.int): lambda n: sorted(n.args[1:3]) in _SWAP_PAIRS,
    ("call_function", torch.permute): lambda n: list(n.args[1]) == [1, 0],
    ("call_function", aten.permute.default): lambda n: list(n.args[1]) == [1, 0],
}


def is_transpose_of_2d(node) -> bool:
    """Does `node` swap the two axes of its (2-D weight) argument?  (W.T, W.t(), W.transpose(0, 1), ...)"""
    try:
        rule = _TRANSPOSES.get((node.op, node.target))
    except TypeError:  # an unhashable target
        return False
    return bool(rule and rule(node))


# ---------------------------------------------------------------- transfer functions
# Read-only views computed from the rows of lwcompile.passes.transfer (kept current when a row is registered):
# TRANSFER_OPTIONS (name -> option names), TRANSFER_MODULES (class, exact type -> name), TRANSFER_FUNCTIONS
# (function or ATen overload -> name), TRANSFER_METHODS (tensor method -> name).

# Element-wise ops that follow a linear op but are not transfer functions lwcompile knows: the block is
# then treated as identity, with a warning naming the node. They are checked after the tables above, so the
# known classes left in here (nn.Hardtanh, ...) only catch their subclasses, and the known names only catch
# spellings the tables lack (an in-place ATen op that reached the partitioner, torch._C._nn.*).
UNKNOWN_ELEMENTWISE_MODULES = (nn.ReLU6, nn.Hardtanh, nn.Mish, nn.SELU, nn.CELU, nn.Hardswish, nn.Hardsigmoid,
                               nn.LogSigmoid, nn.Softsign, nn.Tanhshrink, nn.PReLU, nn.RReLU, nn.Softmin,
                               nn.LogSoftmax, nn.Threshold, nn.Hardshrink, nn.Softshrink, nn.GLU)
UNKNOWN_ELEMENTWISE_NAMES = {"exp", "sin", "cos", "abs", "square", "sqrt", "log", "relu6", "hardtanh", "mish",
                             "selu", "celu", "hardswish", "hardsigmoid", "logsigmoid", "log_sigmoid", "softsign",
                             "log_softmax", "erf", "neg", "reciprocal", "rsqrt", "expm1", "log1p", "sinh", "cosh",
                             "asinh"}

__all__ = ["LINEAR_FUNCTIONS", "LINEAR_MODULES", "MATMUL_FUNCTIONS", "MATMUL_METHODS", "TRANSFER_FUNCTIONS",
           "TRANSFER_METHODS", "TRANSFER_MODULES", "TRANSFER_OPTIONS", "UNKNOWN_ELEMENTWISE_MODULES",
           "UNKNOWN_ELEMENTWISE_NAMES", "is_transpose_of_2d", "linear_for_call", "linear_for_module"]
