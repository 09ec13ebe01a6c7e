"""The convolutions' weight gradient is one grouped op, not a Python loop over groups (a depthwise conv of C channels
traced to C convolutions): equal to autograd in float64 for groups = 1, 2 and C (depthwise), with stride, padding
and dilation, in 1d/2d/3d, for convNd and conv_transposeNd, in the training rows and in their ONNX lowering."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.passes.linear_ops import LINEAR_OPS, _conv_weight_grad_core, _convolution_backward

aten = torch.ops.aten
CASES = [  # (nd, C_in, C_out, groups, stride, padding, dilation, output_padding of the transposed conv)
    (1, 4, 6, 1, 2, 1, 2, 1), (1, 6, 6, 6, 1, 0, 1, 0), (2, 4, 6, 2, (2, 1), (1, 0), (1, 2), (1, 0)),
    (2, 8, 8, 8, 2, 1, 1, 1), (2, 6, 12, 6, 3, 2, 2, 2), (3, 4, 4, 2, 2, 1, 1, 0), (3, 3, 3, 3, 1, 1, (1, 2, 1), 0),
]


def _autograd(transposed, x, w, stride, padding, dilation, groups, output_padding):
    w = w.clone().requires_grad_(True)
    nd = x.dim() - 2
    if transposed:
        z = getattr(F, f"conv_transpose{nd}d")(x, w, None, stride, padding, output_padding, groups, dilation)
    else:
        z = getattr(F, f"conv{nd}d")(x, w, None, stride, padding, dilation, groups)
    r = torch.randn_like(z)
    (z * r).sum().backward()
    return r, w.grad


def _tup(v, nd):
    return tuple(v) if isinstance(v, tuple) else (v,) * nd


@pytest.mark.parametrize("transposed", [False, True], ids=["conv", "conv_transpose"])
@pytest.mark.parametrize("nd,cin,cout,groups,stride,padding,dilation,op", CASES)
def test_the_weight_gradient_equals_autograd_in_float64(transposed, nd, cin, cout, groups, stride, padding,
                                                        dilation, op):
    torch.manual_seed(0)
    x = torch.randn(3, cin, *(7, 6, 5)[:nd], dtype=torch.float64)
    w_shape = (cin, cout // groups) if transposed else (cout, cin // groups)
    w = torch.randn(*w_shape, *(3, 2, 3)[:nd], dtype=torch.float64)
    attrs = {"stride": _tup(stride, nd), "padding": _tup(padding, nd), "dilation": _tup(dilation, nd),
             "groups": groups, "output_padding": _tup(op, nd)}
    if transposed and any(o >= max(s, d) for o, s, d in zip(attrs["output_padding"], attrs["stride"],
                                                            attrs["dilation"])):
        attrs["output_padding"] = (0,) * nd
    r, expected = _autograd(transposed, x, w, attrs["stride"], attrs["padding"], attrs["dilation"], groups,
                            attrs["output_padding"])
    row = LINEAR_OPS[f"conv_transpose{nd}d" if transposed else f"conv{nd}d"]
    dW, db = row.weight_grad(x, r, tuple(w.shape), attrs, True)
    torch.testing.assert_close(dW, expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(db, r.sum(dim=[0] + list(range(2, r.dim()))), rtol=1e-12, atol=1e-12)
    # the ONNX lowering of aten.convolution_backward, in forward convolutions only
    _, gw, _ = _convolution_backward(r, x, w, None, list(attrs["stride"]), list(attrs["padding"]),
                                     list(attrs["dilation"]), transposed, list(attrs["output_padding"]), groups,
                                     [False, True, False])
    torch.testing.assert_close(gw, expected, rtol=1e-10, atol=1e-10)


def _convs(fn, *args) -> int:
    gm = make_fx(fn)(*args)
    return sum(n.op == "call_function" and "conv" in str(n.target) for n in gm.graph.nodes)


def test_a_depthwise_conv_traces_to_one_op_not_one_per_channel():
    x, w = torch.randn(2, 64, 7, 7), torch.randn(64, 1, 3, 3)
    attrs = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 64}
    r = F.conv2d(x, w, None, 1, 1, 1, 64)
    assert _convs(lambda x, r: LINEAR_OPS["conv2d"].weight_grad(x, r, tuple(w.shape), attrs, False)[0], x, r) == 1
    assert _convs(lambda x, r: _conv_weight_grad_core(2, x, r, (3, 3), (1, 1), (1, 1), (1, 1), 64), x, r) == 1
    wt = torch.randn(64, 1, 3, 3)
    attrs_t = dict(attrs, output_padding=(0, 0))
    z = F.conv_transpose2d(x, wt, None, 1, 1, 0, 64)
    assert _convs(lambda x, r: LINEAR_OPS["conv_transpose2d"].weight_grad(x, r, tuple(wt.shape), attrs_t, False)[0],
                  x, z) == 1
