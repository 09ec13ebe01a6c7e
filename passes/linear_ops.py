"""The linear transforms a block can be made of: how to apply them and their weight gradient.

Each kind is one row of ``LINEAR_OPS``: ``apply(x, W, b, attrs) -> z`` and
``weight_grad(x, r, W_shape, attrs) -> (dW, db)``, where r = ∂ℓ/∂z is the residual of the local loss.
The gradients are closed forms written with plain ops (matmul, conv), so an inner-update graph
traces to ordinary forward ops and exports to ONNX unchanged.

Example:
    >>> import torch
    >>> x, W, r = torch.randn(4, 3), torch.randn(2, 3), torch.randn(4, 2)
    >>> dW, db = LINEAR_OPS["linear"].weight_grad(x, r, W.shape, {}, True)
    >>> torch.allclose(dW, r.T @ x) and torch.allclose(db, r.sum(0))
    True
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

Attrs = dict[str, Any]


@dataclass(frozen=True)
class LinearOp:
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None, Attrs], torch.Tensor]
    weight_grad: Callable[..., tuple[torch.Tensor, torch.Tensor | None]]
    # multiply-adds per example, from (x shape, z shape, W shape, attrs)
    macs: Callable[[tuple, tuple, tuple, Attrs], int]


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


# ---------------------------------------------------------------- convNd and conv_transposeNd
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
    """∂/∂W of Σ r·conv(x, W): a convolution of x by r with the roles of stride and dilation swapped.

    Batch and channel axes are swapped so the batch sums inside the conv; groups run one at a time.
    Returns (C_out, C_in/groups, *k).
    """
    conv = _CONV[nd]
    cin, cout = x.shape[1] // groups, r.shape[1] // groups
    parts = []
    for g in range(groups):
        xg = x[:, g * cin:(g + 1) * cin].transpose(0, 1)  # (Cin_g, N, *S)
        rg = r[:, g * cout:(g + 1) * cout].transpose(0, 1)  # (Cout_g, N, *So)
        dw = conv(xg, rg, None, dilation, padding, stride)  # (Cin_g, Cout_g, *k')
        for d in range(nd):  # drop the extra positions a non-divisible stride leaves
            dw = dw.narrow(2 + d, 0, k[d])
        parts.append(dw.transpose(0, 1))
    return parts[0] if groups == 1 else torch.cat(parts, 0)


def _conv_grad(nd):
    def grad(x, r, w_shape, attrs, has_bias):
        x, padding = _pad_input(x, attrs)
        dW = _conv_weight_grad_core(nd, x, r, tuple(w_shape[2:]), attrs["stride"], padding,
                                    attrs["dilation"], attrs["groups"])
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
    # conv_transpose is the adjoint of conv in its input, so its weight gradient is the conv weight
    # gradient with input and residual exchanged; the (C_in, C_out/groups) layout then comes out right.
    def grad(x, r, w_shape, attrs, has_bias):
        g = attrs["groups"]
        dW = _conv_weight_grad_core(nd, r, x, tuple(w_shape[2:]), attrs["stride"], attrs["padding"],
                                    attrs["dilation"], g)
        db = r.sum(dim=[0] + list(range(2, r.dim()))) if has_bias else None
        return dW, db

    return grad


def _conv_t_macs(xs, zs, ws, attrs):
    return _prod(xs[1:]) * _prod(ws[1:])


LINEAR_OPS: dict[str, LinearOp] = {
    "linear": LinearOp(_linear_apply, _linear_grad, _linear_macs),
    "matmul": LinearOp(_matmul_apply, _matmul_grad, _matmul_macs),
}
for _nd in (1, 2, 3):
    LINEAR_OPS[f"conv{_nd}d"] = LinearOp(_conv_apply(_nd), _conv_grad(_nd), _conv_macs)
    LINEAR_OPS[f"conv_transpose{_nd}d"] = LinearOp(_conv_t_apply(_nd), _conv_t_grad(_nd), _conv_t_macs)
