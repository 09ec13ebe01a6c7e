"""The paper's transfer functions, one row each: identity, relu, leaky_relu, tanh, sigmoid, softplus, elu, gelu,
silu, arctan, softmax (see :mod:`lwcompile.passes.transfer_rows.row` for what a row holds).

Example:
    >>> import torch
    >>> t = next(r for r in ROWS if r.name == "tanh")
    >>> z = torch.tensor([0.5])
    >>> bool(torch.allclose(t.vjp(z, torch.ones(1), {}), 1 - torch.tanh(z) ** 2))
    True
    >>> round(float(li2_neg_exp(torch.tensor(0.0, dtype=torch.float64))), 12)  # Li₂(−1) = −π²/12
    -0.822467033424
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.passes.transfer_rows.row import Kw, TransferRow, elementwise

aten = torch.ops.aten


def li2_neg_exp(z: torch.Tensor) -> torch.Tensor:
    """Li₂(−eᶻ), the dilogarithm, accurate in float32/64 for every real z (softplus's and SiLU's potentials).

    For eᶻ ≤ 1 it uses Li₂(x) = Σ Bₙ uⁿ⁺¹/(n+1)! with u = −log(1−x) (fast for x ∈ [−1, 0]); for eᶻ > 1 the
    inversion Li₂(x) = −π²/6 − ½ log²(−x) − Li₂(1/x).
    """
    small = z <= 0
    zs = torch.where(small, z, -z)  # Li₂(−e^{zs}) with zs ≤ 0
    u = -torch.log1p(torch.exp(zs))  # −log(1 − x), x = −e^{zs}
    # Bernoulli numbers B_n for n = 0..18 (odd ones past B_1 vanish).
    bern = [1.0, -0.5, 1 / 6, 0.0, -1 / 30, 0.0, 1 / 42, 0.0, -1 / 30, 0.0, 5 / 66, 0.0,
            -691 / 2730, 0.0, 7 / 6, 0.0, -3617 / 510, 0.0, 43867 / 798]
    acc = torch.zeros_like(z)
    for n, bn in enumerate(bern):
        if bn != 0.0:
            acc = acc + bn * u ** (n + 1) / math.factorial(n + 1)
    inverted = -math.pi ** 2 / 6 - 0.5 * z ** 2 - acc
    return torch.where(small, acc, inverted)


def _relu_F(z, kw, slope=0.0):
    return 0.5 * z * (torch.clamp(z, min=0) - slope * torch.clamp(-z, min=0))


def _softplus(z, kw):
    return F.softplus(z, beta=kw.get("beta", 1.0), threshold=kw.get("threshold", 20.0))


def _softplus_F(z, kw):
    b = kw.get("beta", 1.0)
    return -li2_neg_exp(b * z) / (b * b)


def _elu_F(z, kw):
    a = kw.get("alpha", 1.0)
    return torch.where(z > 0, 0.5 * z * z, a * (torch.expm1(torch.clamp(z, max=0)) - torch.clamp(z, max=0)))


def _elu_accept(target, args: tuple, opts: Kw, z_shape: tuple) -> Kw | str:
    # aten.elu(x, alpha, scale, input_scale): only scale = input_scale = 1 is F.elu
    if target is aten.elu.default and tuple(args[1:3]) not in ((), (1,), (1, 1), (1.0, 1.0)):
        return "has scale or input_scale other than 1 (not F.elu)"
    return opts


def _gelu_prime(z, kw):
    if kw.get("approximate", "none") == "tanh":
        c = math.sqrt(2 / math.pi)
        inner = c * (z + 0.044715 * z ** 3)
        t = torch.tanh(inner)
        return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * c * (1 + 3 * 0.044715 * z * z)
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return cdf + z * pdf


def _gelu_F(z, kw):
    # Exact for the erf form; for approximate="tanh" this is the erf form's integral (a report value only).
    cdf = 0.5 * (1 + torch.erf(z / math.sqrt(2)))
    pdf = torch.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return 0.5 * ((z * z - 1) * cdf + z * pdf) + 0.25


def _silu_prime(z, kw):
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def _silu_F(z, kw):
    return z * F.softplus(z) + li2_neg_exp(z)


def _softmax_vjp(z, v, kw):
    s = torch.softmax(z, dim=-1)
    return s * (v - (s * v).sum(-1, keepdim=True))


def _softmax_accept(target, args: tuple, opts: Kw, z_shape: tuple) -> Kw | str:
    # f is the softmax over the last axis; the axis is read only to check that, and not kept
    dim = opts.get("dim")
    if dim is None or not (dim == -1 or dim == len(z_shape) - 1):
        return "is not over the last axis"
    return {}


ROWS: tuple[TransferRow, ...] = (
    elementwise("identity", lambda z, kw: z, lambda z, kw: torch.ones_like(z), lambda z, kw: 0.5 * z * z,
                modules=(nn.Identity,), onnx_f=lambda g, t, kw: t, onnx_F=lambda g, t, kw: g.half_square(t)),
    elementwise("relu", lambda z, kw: torch.relu(z), lambda z, kw: (z > 0).to(z.dtype), _relu_F,
                modules=(nn.ReLU,), functions=(F.relu, torch.relu, torch.relu_, F.relu_),
                aten=(aten.relu.default, aten.relu_.default), methods=("relu", "relu_"),
                onnx_f=lambda g, t, kw: g("Relu", t), onnx_F=lambda g, t, kw: g.half_square(g("Relu", t))),
    elementwise(
        "leaky_relu", lambda z, kw: F.leaky_relu(z, kw.get("negative_slope", 0.01)),
        lambda z, kw: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, kw.get("negative_slope", 0.01))),
        lambda z, kw: _relu_F(z, kw, kw.get("negative_slope", 0.01)),
        options=("negative_slope",), modules=(nn.LeakyReLU,), functions=(F.leaky_relu,),
        aten=(aten.leaky_relu.default,),
        onnx_f=lambda g, t, kw: g("Add", g("Relu", t), g("Mul", g.const(kw.get("negative_slope", 0.01)),
                                                         g.neg_part(t))),
        onnx_F=lambda g, t, kw: g("Add", g.half_square(g("Relu", t)),
                                  g("Mul", g.const(kw.get("negative_slope", 0.01)), g.half_square(g.neg_part(t))))),
    elementwise("tanh", lambda z, kw: torch.tanh(z), lambda z, kw: 1 - torch.tanh(z) ** 2,
                lambda z, kw: torch.abs(z) + F.softplus(-2 * torch.abs(z)) - math.log(2.0),
                modules=(nn.Tanh,), functions=(torch.tanh, F.tanh), aten=(aten.tanh.default,),
                methods=("tanh", "tanh_"), onnx_f=lambda g, t, kw: g("Tanh", t),
                # log cosh t = |t| + softplus(−2|t|) − log 2
                onnx_F=lambda g, t, kw: g("Sub", g("Add", g("Abs", t),
                                                   g.softplus(g("Mul", g.const(-2.0), g("Abs", t)))),
                                          g.const(0.6931471805599453))),
    elementwise("sigmoid", lambda z, kw: torch.sigmoid(z), lambda z, kw: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
                lambda z, kw: z + F.softplus(-z),
                modules=(nn.Sigmoid,), functions=(torch.sigmoid, F.sigmoid), aten=(aten.sigmoid.default,),
                methods=("sigmoid", "sigmoid_"), onnx_f=lambda g, t, kw: g("Sigmoid", t),
                onnx_F=lambda g, t, kw: g("Add", t, g.softplus(g("Neg", t)))),  # t + softplus(−t) = log(1 + e^t)
    elementwise(
        "softplus", _softplus,
        lambda z, kw: torch.sigmoid(kw.get("beta", 1.0) * z) * (kw.get("beta", 1.0) * z <= kw.get("threshold", 20.0))
        + (kw.get("beta", 1.0) * z > kw.get("threshold", 20.0)).to(z.dtype),
        _softplus_F, options=("beta", "threshold"), modules=(nn.Softplus,), functions=(F.softplus,),
        aten=(aten.softplus.default,),
        onnx_f=lambda g, t, kw: g("Div", g.softplus(g("Mul", g.const(kw.get("beta", 1.0)), t)),
                                  g.const(kw.get("beta", 1.0)))),  # no ONNX F: it needs the dilogarithm
    elementwise(
        "elu", lambda z, kw: F.elu(z, kw.get("alpha", 1.0)),
        lambda z, kw: torch.where(z > 0, torch.ones_like(z), kw.get("alpha", 1.0) * torch.exp(torch.clamp(z, max=0))),
        _elu_F, options=("alpha",), modules=(nn.ELU,), functions=(F.elu,), aten=(aten.elu.default,),
        accept=_elu_accept,
        onnx_f=lambda g, t, kw: g("Add", g("Relu", t), g("Mul", g.const(kw.get("alpha", 1.0)),
                                                         g("Sub", g("Exp", g.neg_part(t)), g.const(1.0)))),
        onnx_F=lambda g, t, kw: g("Add", g.half_square(g("Relu", t)),
                                  g("Mul", g.const(kw.get("alpha", 1.0)),
                                    g("Sub", g("Sub", g("Exp", g.neg_part(t)), g.const(1.0)), g.neg_part(t))))),
    elementwise("gelu", lambda z, kw: F.gelu(z, approximate=kw.get("approximate", "none")), _gelu_prime, _gelu_F,
                options=("approximate",), modules=(nn.GELU,), functions=(F.gelu,), aten=(aten.gelu.default,)),
    elementwise("silu", lambda z, kw: F.silu(z), _silu_prime, _silu_F,
                modules=(nn.SiLU,), functions=(F.silu,), aten=(aten.silu.default,)),
    elementwise("arctan", lambda z, kw: torch.atan(z), lambda z, kw: 1 / (1 + z * z),
                lambda z, kw: z * torch.atan(z) - 0.5 * torch.log1p(z * z),
                functions=(torch.atan, torch.arctan), aten=(aten.atan.default,), methods=("atan", "arctan")),
    TransferRow("softmax", f=lambda z, kw: torch.softmax(z, dim=-1), F=lambda z, kw: torch.logsumexp(z, dim=-1),
                jacobian_vjp=_softmax_vjp, options=("dim",), modules=(nn.Softmax,),
                functions=(F.softmax, torch.softmax), aten=(aten.softmax.int, aten._softmax.default),
                methods=("softmax",), accept=_softmax_accept),
)
