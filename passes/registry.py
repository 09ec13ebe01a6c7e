"""Tables the partitioner reads: which graph ops are linear in a weight, which are transfer functions.

Policy as data (STYLE.md): to teach lwcompile a new op, add a row here; the partition pass stays generic.
Each op appears in its three FX spellings: module (symbolic trace), function / tensor method (symbolic
trace), and ATen overload (torch.export).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import nn

aten = torch.ops.aten

# ---------------------------------------------------------------- linear ops
LINEAR_MODULES: dict[type, str] = {
    nn.Linear: "linear",
    nn.Conv1d: "conv1d", nn.Conv2d: "conv2d", nn.Conv3d: "conv3d",
    nn.ConvTranspose1d: "conv_transpose1d", nn.ConvTranspose2d: "conv_transpose2d",
    nn.ConvTranspose3d: "conv_transpose3d",
}
# function -> op kind; arguments follow F.linear / F.convNd / F.conv_transposeNd order.
LINEAR_FUNCTIONS: dict[object, str] = {
    F.linear: "linear", aten.linear.default: "linear",
    torch.conv1d: "conv1d", torch.conv2d: "conv2d", torch.conv3d: "conv3d",
    aten.conv1d.default: "conv1d", aten.conv2d.default: "conv2d", aten.conv3d.default: "conv3d",
    aten.conv1d.padding: "conv1d", aten.conv2d.padding: "conv2d", aten.conv3d.padding: "conv3d",
    torch.conv_transpose1d: "conv_transpose1d", torch.conv_transpose2d: "conv_transpose2d",
    torch.conv_transpose3d: "conv_transpose3d",
    aten.conv_transpose1d.default: "conv_transpose1d", aten.conv_transpose2d.input: "conv_transpose2d",
    aten.conv_transpose3d.input: "conv_transpose3d",
}
MATMUL_FUNCTIONS = {operator.matmul, torch.matmul, torch.mm, aten.matmul.default, aten.mm.default}
MATMUL_METHODS = {"matmul", "__matmul__", "mm"}


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
# name -> the option names it carries (read from module attributes or call arguments, in positional order)
TRANSFER_OPTIONS: dict[str, tuple[str, ...]] = {
    "relu": (), "tanh": (), "sigmoid": (), "silu": (), "arctan": (), "identity": (),
    "leaky_relu": ("negative_slope",), "softplus": ("beta", "threshold"), "elu": ("alpha",),
    "gelu": ("approximate",), "softmax": ("dim",),
    "hardtanh": ("min_val", "max_val"), "relu6": (), "hardsigmoid": (), "hardswish": (), "selu": (),
    "celu": ("alpha",), "mish": (), "logsigmoid": (), "softsign": (),
}
# Looked up by exact type (nn.ReLU6 subclasses nn.Hardtanh but has its own row).
TRANSFER_MODULES: dict[type, str] = {
    nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.SiLU: "silu", nn.LeakyReLU: "leaky_relu",
    nn.Softplus: "softplus", nn.ELU: "elu", nn.GELU: "gelu", nn.Softmax: "softmax", nn.Identity: "identity",
    nn.Hardtanh: "hardtanh", nn.ReLU6: "relu6", nn.Hardsigmoid: "hardsigmoid", nn.Hardswish: "hardswish",
    nn.SELU: "selu", nn.CELU: "celu", nn.Mish: "mish", nn.LogSigmoid: "logsigmoid", nn.Softsign: "softsign",
}
# torch.export spellings: relu6 stays aten.relu6; F.softsign is Python (x / (1 + |x|)) and exports as three ops,
# so only its module and F forms are recognised. In-place ATen forms are made out-of-place before partitioning.
TRANSFER_FUNCTIONS: dict[object, str] = {
    F.relu: "relu", torch.relu: "relu", torch.relu_: "relu", F.relu_: "relu",
    torch.tanh: "tanh", F.tanh: "tanh", torch.sigmoid: "sigmoid", F.sigmoid: "sigmoid",
    F.silu: "silu", F.leaky_relu: "leaky_relu", F.softplus: "softplus", F.elu: "elu", F.gelu: "gelu",
    torch.atan: "arctan", torch.arctan: "arctan", F.softmax: "softmax", torch.softmax: "softmax",
    F.hardtanh: "hardtanh", F.relu6: "relu6", F.hardsigmoid: "hardsigmoid", F.hardswish: "hardswish",
    F.selu: "selu", torch.selu: "selu", F.celu: "celu", torch.celu: "celu", F.mish: "mish",
    F.logsigmoid: "logsigmoid", F.softsign: "softsign",
    aten.relu.default: "relu", aten.relu_.default: "relu", aten.tanh.default: "tanh",
    aten.sigmoid.default: "sigmoid", aten.silu.default: "silu", aten.leaky_relu.default: "leaky_relu",
    aten.softplus.default: "softplus", aten.elu.default: "elu", aten.gelu.default: "gelu",
    aten.atan.default: "arctan", aten.softmax.int: "softmax", aten._softmax.default: "softmax",
    aten.hardtanh.default: "hardtanh", aten.relu6.default: "relu6", aten.hardsigmoid.default: "hardsigmoid",
    aten.hardswish.default: "hardswish", aten.selu.default: "selu", aten.celu.default: "celu",
    aten.mish.default: "mish", aten.log_sigmoid.default: "logsigmoid",
}
# torch.Tensor has no method for any of the transfers added after the paper's (no x.hardswish(), x.mish(), ...).
TRANSFER_METHODS: dict[str, str] = {
    "relu": "relu", "relu_": "relu", "tanh": "tanh", "tanh_": "tanh", "sigmoid": "sigmoid",
    "sigmoid_": "sigmoid", "atan": "arctan", "arctan": "arctan", "softmax": "softmax"}

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
