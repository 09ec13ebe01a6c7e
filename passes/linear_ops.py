"""The linear transforms a block can be made of, one :class:`LinearOpRow` per op kind in ``LINEAR_OPS``.

A row holds everything lwcompile knows about the op: how a traced graph spells it (module classes, functions and
ATen overloads called ``f(input, weight, bias, *attr_args)``, or ``x @ W`` / tensor methods for matmul), how its
attributes are read (from a module, or from a call's arguments, with their defaults), ``apply(x, W, b, attrs) -> z``,
``weight_grad(x, r, W_shape, attrs, has_bias) -> (dW, db)`` where r = ∂ℓ/∂z is the residual of the local loss (the
weight VJP), ``macs`` (multiply-adds per example) and its ONNX lowering: the decompositions of backward ops its
gradient makes that torchlib lacks (``onnx_decompositions``). The weight gradients are closed forms written with
plain ops (matmul, conv), so an inner-update graph traces to ordinary forward ops and exports to ONNX unchanged.
The partitioner's lookups (:mod:`lwcompile.passes.registry`) are computed from the rows.

Example:
    >>> import torch
    >>> x, W, r = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    >>> dW, db = LINEAR_OPS["linear"].weight_grad(x, r, W.shape, {}, True)
    >>> torch.allclose(dW, r.T @ x) and torch.allclose(db, r.sum(0))
    True
    >>> LINEAR_OPS["conv2d"].call_attrs((6, 4, 3, 3), [2], {"padding": "same"})
    (('dilation', (1, 1)), ('groups', 1), ('padding', (1, 1)), ('stride', (2, 2)))
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

Attrs = dict[str, Any]
aten = torch.ops.aten


@dataclass(frozen=True)
class LinearOpRow:
    """One linear op kind. ``call``: "weight" (``f(input, weight, bias, *attr_args)``) or "matmul" (``x @ W``, W
    2-D; ``x @ Wᵀ`` is then the op named ``transposed``) or "addmm" (``f(bias, input, weight, beta=, alpha=)``). ``module_attrs(mod)`` / ``call_attrs(W shape, positional
    args after bias, keywords)`` give the attributes as a sorted tuple of items, or None when the op cannot be
    a block (asymmetric "same" padding)."""

    name: str
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, Attrs], torch.Tensor]
    weight_grad: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    macs: Callable[[tuple, tuple, tuple, Attrs], int]  # from (x shape, z shape, W shape, attrs)
    modules: tuple[type, ...] = ()  # exact type first, then subclasses
    functions: tuple[Any, ...] = ()  # Python functions and ATen overloads
    methods: tuple[str, ...] = ()  # torch.Tensor method names (matmul)
    call: str = "weight"
    transposed: str | None = None
    attr_args: tuple[str, ...] = ()  # positional attribute arguments after bias, in call order
    default_attrs: Mapping[str, Any] = field(default_factory=dict)  # normalized attributes of a default call
    module_attrs: Callable[[nn.Module], tuple | None] = lambda mod: ()
    call_attrs: Callable[[tuple, list, dict], tuple | None] = lambda w_shape, args, kwargs: ()
    onnx_decompositions: Mapping[Any, Callable] = field(default_factory=dict)


def _prod(xs) -> int:
    n = 1
    for v in xs:
        n *= int(v)
    return n


# ---------------------------------------------------------------- linear: z = x Wᵀ + b, W (out, in)
def _linear_apply(x, W, b, attrs):
    return F.linear(x, W, b)


def _linear_grad(x, r, w_shape, attrs, has_bias):
    x2 = x.reshape(-1, x.shape[-1])
    r2 = r.reshape(-1, r.shape[-1])
    dW = r2.transpose(0, 1) @ x2
    return dW, (r2.sum(0) if has_bias else None)


def _linear_macs(xs, zs, ws, attrs):
    return _prod(zs[1:]) * int(ws[1])


# ---------------------------------------------------------------- matmul: z = x W (+ b), W (in, out)
def _matmul_apply(x, W, b, attrs):
    z = x @ W
    return z if b is None else z + b


def _matmul_grad(x, r, w_shape, attrs, has_bias):
    x2 = x.reshape(-1, x.shape[-1])
    r2 = r.reshape(-1, r.shape[-1])
    return x2.transpose(0, 1) @ r2, (r2.sum(0) if has_bias else None)


def _matmul_macs(xs, zs, ws, attrs):
    return _prod(zs[1:]) * int(ws[0])


# ---------------------------------------------------------------- addmm / baddbmm: z = β·b + α·(x W), W (in, out)
# torch.addmm(bias, x, W) (HF GPT-2's Conv1D) and torch.baddbmm(bias, x, W) with W (G, in, out). The attributes keep
# α, β and the bias's shape (it may broadcast: (out,), (1, out), (G, 1, out), ...), so the bias gradient is the
# residual summed down to that shape and the row stays exact for every call torch accepts.
def _addmm_attrs(w_shape: tuple, args: list, kwargs: dict) -> tuple:
    # ``args`` holds the bias's shape (the partitioner reads it from the parameter); keywords α and β
    alpha, beta = kwargs.get("alpha", 1), kwargs.get("beta", 1)
    bias_shape = tuple(int(s) for s in args[0]) if args else ()
    return tuple(sorted({"alpha": alpha, "beta": beta, "bias_shape": bias_shape}.items()))


def _addmm_apply(batched: bool):
    fn = torch.baddbmm if batched else torch.addmm

    def apply(x, W, b, attrs):
        alpha, beta = attrs.get("alpha", 1), attrs.get("beta", 1)
        if b is None:
            z = torch.bmm(x, W) if batched else x @ W
            return z if alpha == 1 else alpha * z
        return fn(b, x, W, beta=beta, alpha=alpha)

    return apply


def _addmm_grad(batched: bool):
    def grad(x, r, w_shape, attrs, has_bias):
        alpha, beta = attrs.get("alpha", 1), attrs.get("beta", 1)
        dW = torch.bmm(x.transpose(1, 2), r) if batched else x.transpose(0, 1) @ r
        if alpha != 1:
            dW = alpha * dW
        if not has_bias:
            return dW, None
        db = r.sum_to_size(attrs.get("bias_shape", (r.shape[-1],)))
        return dW, (db if beta == 1 else beta * db)

    return grad


def _addmm_macs(xs, zs, ws, attrs):
    return _prod(zs[1:]) * int(ws[-2])


# ---------------------------------------------------------------- convNd and conv_transposeNd: attributes
_CONV_ARGS = ("stride", "padding", "dilation", "groups")  # F.convNd's order after bias
_CONV_T_ARGS = ("stride", "padding", "output_padding", "groups", "dilation")  # F.conv_transposeNd's
_CONV_DEFAULTS = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}


def _tuple(v, nd: int) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(int(a) for a in v) if len(v) == nd else tuple(int(v[0]) for _ in range(nd))
    return (int(v),) * nd


def _same_padding(pad: Any, dil: tuple, k: tuple, nd: int) -> tuple | None:
    if pad == "valid":
        return (0,) * nd
    if pad == "same":
        if any((d * (kk - 1)) % 2 for d, kk in zip(dil, k)):
            return None  # asymmetric: torch pads one side more; not a plain conv
        return tuple(d * (kk - 1) // 2 for d, kk in zip(dil, k))
    return _tuple(pad, nd)


def _conv_attrs(nd: int, names: tuple[str, ...]) -> Callable[[tuple, list, dict], tuple | None]:
    def read(w_shape: tuple, args: list, kwargs: dict) -> tuple | None:
        vals = dict(zip(names, args))
        vals.update({k: v for k, v in kwargs.items() if k in names})
        get = lambda k: vals.get(k, _CONV_DEFAULTS[k])  # noqa: E731
        dil = _tuple(get("dilation"), nd)
        attrs = {"stride": _tuple(get("stride"), nd), "dilation": dil, "groups": int(get("groups"))}
        pad = _same_padding(get("padding"), dil, tuple(w_shape[2:]), nd)
        if pad is None:
            return None
        attrs["padding"] = pad
        if "output_padding" in names:
            attrs["output_padding"] = _tuple(get("output_padding"), nd)
        return tuple(sorted(attrs.items()))

    return read


def _conv_module_attrs(nd: int) -> Callable[[nn.Module], tuple | None]:
    read = _conv_attrs(nd, _CONV_ARGS)

    def from_module(mod: nn.Module) -> tuple | None:
        attrs = read(tuple(mod.weight.shape), [mod.stride, mod.padding, mod.dilation, mod.groups], {})
        if attrs is not None and mod.padding_mode != "zeros":
            attrs = tuple(sorted(dict(attrs, padding_mode=mod.padding_mode,
                                      reversed_padding=tuple(mod._reversed_padding_repeated_twice)).items()))
        return attrs

    return from_module


def _conv_t_module_attrs(nd: int) -> Callable[[nn.Module], tuple | None]:
    read = _conv_attrs(nd, _CONV_T_ARGS)
    return lambda mod: read(tuple(mod.weight.shape),
                            [mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation], {})


# ---------------------------------------------------------------- convNd and conv_transposeNd: math
_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}
_CONV_T = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def _pad_input(x, attrs):
    # nn.ConvNd with padding_mode != "zeros" pads explicitly, then convolves with padding 0.
    mode = attrs.get("padding_mode", "zeros")
    if mode == "zeros":
        return x, attrs["padding"]
    return F.pad(x, attrs["reversed_padding"], mode=mode), (0,) * len(attrs["padding"])


def _conv_apply(nd):
    def apply(x, W, b, attrs):
        x, padding = _pad_input(x, attrs)
        return _CONV[nd](x, W, b, attrs["stride"], padding, attrs["dilation"], attrs["groups"])

    return apply


def _conv_weight_grad_core(nd, x, r, k, stride, padding, dilation, groups):
    """∂/∂W of Σ r·conv(x, W) as one forward convolution (the ONNX lowering of ``aten.convolution_backward``).

    A convolution of x by r with the roles of stride and dilation swapped; the batch becomes the convolution's input
    channels so it sums inside, and every group is one group of a single grouped convolution (input channels ordered
    (group, example), output channels (group, C_out/groups)): no loop over groups. Returns (C_out, C_in/groups, *k).
    """
    n, cin, cout = x.shape[0], x.shape[1] // groups, r.shape[1] // groups
    xs = x.reshape(n, groups, cin, *x.shape[2:]).transpose(0, 2).reshape(cin, groups * n, *x.shape[2:])
    rs = r.reshape(n, groups, cout, *r.shape[2:]).movedim(0, 2).reshape(groups * cout, n, *r.shape[2:])
    dw = _CONV[nd](xs, rs, None, dilation, padding, stride, groups)  # (C_in/groups, C_out, *k')
    for d in range(nd):  # drop the extra positions a non-divisible stride leaves
        dw = dw.narrow(2 + d, 0, k[d])
    return dw.transpose(0, 1)


def _conv_weight_grad(x, r, w_shape, stride, padding, dilation, groups, transposed=False, output_padding=None):
    """∂/∂W of Σ r·convNd(x, W) (or conv_transposeNd) as one ``aten.convolution_backward`` asking only for the
    weight: torch's own grouped kernel (a Python loop over groups made a depthwise conv of C channels C convolutions
    in the traced graph); ONNX export lowers it with :func:`_conv_weight_grad_core`."""
    nd = x.dim() - 2
    # read for its shape only; the inner graphs pass the weight itself, so that no weight-shape constant is
    # baked into the graph and blocks of other channel counts can share it (lwcompile.passes.inner_share)
    weight = w_shape if isinstance(w_shape, torch.Tensor) else x.new_empty(tuple(w_shape))
    return aten.convolution_backward.default(
        r, x, weight, None, list(stride), list(padding), list(dilation), transposed,
        list(output_padding if output_padding is not None else (0,) * nd), groups, [False, True, False])[1]


def _conv_grad(nd):
    def grad(x, r, w_shape, attrs, has_bias):
        x, padding = _pad_input(x, attrs)
        dW = _conv_weight_grad(x, r, w_shape, attrs["stride"], padding, attrs["dilation"], attrs["groups"])
        db = r.sum(dim=[0] + list(range(2, r.dim()))) if has_bias else None
        return dW, db

    return grad


def _conv_macs(xs, zs, ws, attrs):
    return _prod(zs[1:]) * _prod(ws[1:])


def _conv_t_apply(nd):
    def apply(x, W, b, attrs):
        return _CONV_T[nd](x, W, b, attrs["stride"], attrs["padding"], attrs["output_padding"],
                           attrs["groups"], attrs["dilation"])

    return apply


def _conv_t_grad(nd):
    def grad(x, r, w_shape, attrs, has_bias):
        dW = _conv_weight_grad(x, r, w_shape, attrs["stride"], attrs["padding"], attrs["dilation"], attrs["groups"],
                               transposed=True, output_padding=attrs["output_padding"])
        db = r.sum(dim=[0] + list(range(2, r.dim()))) if has_bias else None
        return dW, db

    return grad


def _conv_t_macs(xs, zs, ws, attrs):
    return _prod(xs[1:]) * _prod(ws[1:])


# ---------------------------------------------------------------- convolutions' ONNX lowering
def _aten_conv(x, w, stride, padding, dilation, transposed=False, output_padding=None, groups=1):
    nd = x.dim() - 2
    return aten.convolution.default(x, w, None, list(stride), list(padding), list(dilation), transposed,
                                    list(output_padding or [0] * nd), groups)


def _convolution_backward(grad_output, input, weight, bias_sizes, stride, padding, dilation, transposed,
                          output_padding, groups, output_mask):
    """aten.convolution_backward in forward convolutions (torchlib has no translation of it)."""
    nd = input.dim() - 2
    k = list(weight.shape[2:])
    gi = gw = gb = None
    if not transposed:
        if output_mask[0]:
            # adjoint of conv in its input is conv_transpose; output_padding restores the trailing positions
            op = []
            for d in range(nd):
                full = (grad_output.shape[2 + d] - 1) * stride[d] - 2 * padding[d] + dilation[d] * (k[d] - 1) + 1
                op.append(input.shape[2 + d] - full)
            gi = _aten_conv(grad_output, weight, stride, padding, dilation, True, op, groups)
        if output_mask[1]:
            gw = _conv_weight_grad_core(nd, input, grad_output, k, stride, padding, dilation, groups)
    else:
        if output_mask[0]:
            gi = _aten_conv(grad_output, weight, stride, padding, dilation, False, None, groups)
        if output_mask[1]:
            # conv_transpose is the adjoint of conv: its weight gradient is conv's with x and gy exchanged
            gw = _conv_weight_grad_core(nd, grad_output, input, k, stride, padding, dilation, groups)
    if output_mask[2]:
        gb = grad_output.sum(dim=[0] + list(range(2, grad_output.dim())))
    return gi, gw, gb


_CONV_ONNX = {aten.convolution_backward.default: _convolution_backward}


# ---------------------------------------------------------------- the table
def _conv_row(nd: int) -> LinearOpRow:
    torch_fn, pad = getattr(torch, f"conv{nd}d"), getattr(aten, f"conv{nd}d")
    return LinearOpRow(
        f"conv{nd}d", _conv_apply(nd), _conv_grad(nd), _conv_macs, modules=(getattr(nn, f"Conv{nd}d"),),
        functions=(torch_fn, pad.default, pad.padding), attr_args=_CONV_ARGS,
        default_attrs=dict(_conv_attrs(nd, _CONV_ARGS)((0, 0) + (1,) * nd, [], {})),
        module_attrs=_conv_module_attrs(nd), call_attrs=_conv_attrs(nd, _CONV_ARGS), onnx_decompositions=_CONV_ONNX)


def _conv_t_row(nd: int) -> LinearOpRow:
    aten_op = aten.conv_transpose1d.default if nd == 1 else getattr(aten, f"conv_transpose{nd}d").input
    return LinearOpRow(
        f"conv_transpose{nd}d", _conv_t_apply(nd), _conv_t_grad(nd), _conv_t_macs,
        modules=(getattr(nn, f"ConvTranspose{nd}d"),), functions=(getattr(torch, f"conv_transpose{nd}d"), aten_op),
        attr_args=_CONV_T_ARGS, default_attrs=dict(_conv_attrs(nd, _CONV_T_ARGS)((0, 0) + (1,) * nd, [], {})),
        module_attrs=_conv_t_module_attrs(nd), call_attrs=_conv_attrs(nd, _CONV_T_ARGS),
        onnx_decompositions=_CONV_ONNX)


_ROWS = (
    LinearOpRow("linear", _linear_apply, _linear_grad, _linear_macs, modules=(nn.Linear,),
                functions=(F.linear, aten.linear.default)),
    LinearOpRow("matmul", _matmul_apply, _matmul_grad, _matmul_macs, call="matmul", transposed="linear",
                functions=(operator.matmul, torch.matmul, torch.mm, aten.matmul.default, aten.mm.default),
                methods=("matmul", "__matmul__", "mm")),
    LinearOpRow("addmm", _addmm_apply(False), _addmm_grad(False), _addmm_macs, call="addmm",
                functions=(torch.addmm, aten.addmm.default), methods=("addmm",), call_attrs=_addmm_attrs,
                default_attrs={"alpha": 1, "beta": 1}),
    LinearOpRow("baddbmm", _addmm_apply(True), _addmm_grad(True), _addmm_macs, call="addmm",
                functions=(torch.baddbmm, aten.baddbmm.default), methods=("baddbmm",), call_attrs=_addmm_attrs,
                default_attrs={"alpha": 1, "beta": 1}),
    *(_conv_row(nd) for nd in (1, 2, 3)),
    *(_conv_t_row(nd) for nd in (1, 2, 3)),
)
LINEAR_OPS: Mapping[str, LinearOpRow] = {r.name: r for r in _ROWS}
LinearOp = LinearOpRow  # the rows' name before they carried their recognition and ONNX lowering
