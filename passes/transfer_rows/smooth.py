"""The exponential and smooth families, one row each: selu, celu (self-normalising nets), mish, logsigmoid,
softsign. Mish's F is a quadrature and logsigmoid's needs the dilogarithm: they have no ONNX F.

Example:
    >>> import torch
    >>> row = next(r for r in ROWS if r.name == "softsign")
    >>> row.fprime(torch.tensor([1.0]), {})  # 1/(1 + |z|)²
    tensor([0.2500])
"""
from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.passes.transfer_rows.clamp import half_sq_relu
from lwcompile.passes.transfer_rows.paper import li2_neg_exp
from lwcompile.passes.transfer_rows.row import Kw, TransferRow, elementwise

if TYPE_CHECKING:  # ONNX builders only call its methods: onnx is not imported to define a row
    from lwcompile.passes.onnx_nodes import OnnxNodes

aten = torch.ops.aten

# ------------------------------------------------ exponential family: selu, celu
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _selu_prime(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    return SELU_SCALE * torch.where(z > 0, torch.ones_like(z), SELU_ALPHA * torch.exp(torch.clamp(z, max=0)))


def _selu_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    m = torch.clamp(z, max=0)
    return SELU_SCALE * (half_sq_relu(z) + SELU_ALPHA * (torch.expm1(m) - m))


def _celu_prime(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # e^{z/α}, written as torch's celu backward computes it: elu_backward with input scale 1/float32(α)
    a = float(kw.get("alpha", 1.0))
    inv = 1.0 / float(np.float32(a))
    return torch.where(z > 0, torch.ones_like(z), a * torch.exp(torch.clamp(z, max=0) * inv) * inv)


def _celu_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # ∫₀ᶻ α(e^{t/α} − 1) dt = α(α(e^{z/α} − 1) − z) for z ≤ 0
    a, m = kw.get("alpha", 1.0), torch.clamp(z, max=0)
    return half_sq_relu(z) + a * (a * torch.expm1(m / a) - m)


def _exp_linear(g: OnnxNodes, t: str, alpha: float, k: float) -> str:
    """relu(t) + α(e^{k·min(t, 0)} − 1) as ONNX nodes: ELU-shaped; SELU (times its scale) and CELU (k = 1/α)."""
    return g("Add", g("Relu", t), g.scale(g.shift(g("Exp", g.scale(g.neg_part(t), k)), -1.0), alpha))


def _exp_linear_potential(g: OnnxNodes, t: str, alpha: float, k: float) -> str:
    """½relu(t)² + α((e^{k·m} − 1)/k − m), m = min(t, 0): the integral of :func:`_exp_linear`."""
    m = g.neg_part(t)
    neg = g("Sub", g.scale(g.shift(g("Exp", g.scale(m, k)), -1.0), 1 / k), m)
    return g("Add", g.half_square(g("Relu", t)), g.scale(neg, alpha))


# ------------------------------------------------ smooth ones: mish, logsigmoid, softsign
def _mish_prime(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    t = torch.tanh(F.softplus(z))
    return t + z * torch.sigmoid(z) * (1 - t * t)  # torch's mish_backward formula


# Gauss–Legendre nodes/weights on [0, 1] for Mish's potential (see _mish_F).
_GL_X, _GL_WX = np.polynomial.legendre.leggauss(40)
_GL_S = tuple(float(x + 1) / 2 for x in _GL_X)  # mapped from [−1, 1]
_GL_W = tuple(float(w) / 2 for w in _GL_WX)


def _mish_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    """∫₀ᶻ mish: no closed form (it needs the complex dilogarithm), so ½relu(z)² plus a 40-node Gauss–Legendre
    quadrature of m = mish − relu on [0, c], c = clamp(z, −36, 18).

    The kink of relu sits at an end of [0, c], so m is analytic on it; m decays like 2t·e^{−2t} (t > 0) and t·eᵗ
    (t < 0), so the tails past the clamp are below 1e−14. Error ≈ 2e−13 relative (checked against mpmath), and
    its autograd derivative is f to the same accuracy. Report-only, but it costs 40× the memory of z: element-wise
    ops on a (…, 40) tensor, traceable like every other F.
    """
    s = torch.tensor(_GL_S, dtype=z.dtype, device=z.device)
    w = torch.tensor(_GL_W, dtype=z.dtype, device=z.device)
    c = torch.clamp(z, -36.0, 18.0)
    t = c.unsqueeze(-1) * s
    return half_sq_relu(z) + c * ((F.mish(t) - torch.relu(t)) * w).sum(-1)


def _logsigmoid_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # log σ(z) = −softplus(−z), so F(z) = S(−z) − S(0) with S = −Li₂(−eᵘ) softplus's potential, S(0) = π²/12.
    return -li2_neg_exp(-z) - math.pi ** 2 / 12


# torch.Tensor has no method for any of these (no x.selu(), x.mish(), ...). F.softsign is Python (x / (1 + |x|))
# and exports as three ATen ops, so only its module and F forms are recognised.
ROWS: tuple[TransferRow, ...] = (
    elementwise("selu", lambda z, kw: F.selu(z), _selu_prime, _selu_F,
                modules=(nn.SELU,), functions=(F.selu, torch.selu), aten=(aten.selu.default,),
                onnx_f=lambda g, t, kw: g.scale(_exp_linear(g, t, SELU_ALPHA, 1.0), SELU_SCALE),
                onnx_F=lambda g, t, kw: g.scale(_exp_linear_potential(g, t, SELU_ALPHA, 1.0), SELU_SCALE)),
    elementwise("celu", lambda z, kw: F.celu(z, kw.get("alpha", 1.0)), _celu_prime, _celu_F,
                options=("alpha",), modules=(nn.CELU,), functions=(F.celu, torch.celu), aten=(aten.celu.default,),
                onnx_f=lambda g, t, kw: _exp_linear(g, t, kw.get("alpha", 1.0), 1 / kw.get("alpha", 1.0)),
                onnx_F=lambda g, t, kw: _exp_linear_potential(g, t, kw.get("alpha", 1.0), 1 / kw.get("alpha", 1.0))),
    elementwise("mish", lambda z, kw: F.mish(z), _mish_prime, _mish_F,
                modules=(nn.Mish,), functions=(F.mish,), aten=(aten.mish.default,),
                onnx_f=lambda g, t, kw: g("Mul", t, g("Tanh", g.softplus(t)))),
    elementwise("logsigmoid", lambda z, kw: F.logsigmoid(z), lambda z, kw: torch.sigmoid(-z), _logsigmoid_F,
                modules=(nn.LogSigmoid,), functions=(F.logsigmoid,), aten=(aten.log_sigmoid.default,),
                onnx_f=lambda g, t, kw: g("Neg", g.softplus(g("Neg", t)))),
    elementwise("softsign", lambda z, kw: F.softsign(z), lambda z, kw: 1 / (1 + torch.abs(z)) ** 2,
                lambda z, kw: torch.abs(z) - torch.log1p(torch.abs(z)),
                modules=(nn.Softsign,), functions=(F.softsign,),
                onnx_f=lambda g, t, kw: g("Div", t, g.shift(g("Abs", t), 1.0)),
                # |t| − log(1 + |t|)
                onnx_F=lambda g, t, kw: g("Sub", g("Abs", t), g("Log", g.shift(g("Abs", t), 1.0)))),
)
