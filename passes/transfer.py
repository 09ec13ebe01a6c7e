"""Transfer functions f of METHOD.md: the function, its vector-Jacobian product, and F with F′ = f.

One row per function in ``TRANSFERS``. ``vjp(z, v)`` is f′(z)ᵀv (element-wise f′(z) ⊙ v; for softmax
the symmetric Jacobian product). ``F(z)`` is an antiderivative of f (convex where f increases)
used only to *report* matching-loss values; the inner updates never need it, nor f⁻¹. Past the paper's
functions the table has those of mobile and self-normalising nets (hardtanh, relu6, hardsigmoid, hardswish, selu,
celu, mish, logsigmoid, softsign); users add their own with :func:`lwcompile.register_transfer`.

Example:
    >>> import torch
    >>> t = TRANSFERS["tanh"]
    >>> z = torch.tensor([0.5])
    >>> bool(torch.allclose(t.vjp(z, torch.ones(1), {}), 1 - torch.tanh(z) ** 2))
    True
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F

Kw = dict[str, Any]


@dataclass(frozen=True)
class Transfer:
    """One transfer function: f(z, kw), vjp(z, v, kw) = f′(z)ᵀv and F(z, kw) with F′ = f (kw: its options)."""

    f: Callable[[torch.Tensor, Kw], torch.Tensor]
    vjp: Callable[[torch.Tensor, torch.Tensor, Kw], torch.Tensor]
    F: Callable[[torch.Tensor, Kw], torch.Tensor]  # element-wise (or per-row for softmax) integral


def _li2_neg_exp(z: torch.Tensor) -> torch.Tensor:
    """Li₂(−eᶻ), the dilogarithm, accurate in float32/64 for every real z.

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


def _elementwise(f, fprime, F_):
    return Transfer(f=f, vjp=lambda z, v, kw: fprime(z, kw) * v, F=F_)


def _relu_F(z, kw, slope=0.0):
    return 0.5 * z * (torch.clamp(z, min=0) - slope * torch.clamp(-z, min=0))


def _softplus(z, kw):
    return F.softplus(z, beta=kw.get("beta", 1.0), threshold=kw.get("threshold", 20.0))


def _softplus_F(z, kw):
    b = kw.get("beta", 1.0)
    return -_li2_neg_exp(b * z) / (b * b)


def _elu_F(z, kw):
    a = kw.get("alpha", 1.0)
    return torch.where(z > 0, 0.5 * z * z, a * (torch.expm1(torch.clamp(z, max=0)) - torch.clamp(z, max=0)))


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
    return z * F.softplus(z) + _li2_neg_exp(z)


# ------------------------------------------------ clamp family: hardtanh, relu6, hardsigmoid, hardswish
def _half_sq_relu(u: torch.Tensor) -> torch.Tensor:
    return 0.5 * torch.clamp(u, min=0) ** 2


def _clamp_F(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """∫₀ᶻ clamp(t, lo, hi) dt, from clamp(t) = lo + relu(t − lo) − relu(t − hi) (any lo ≤ hi, not only lo ≤ 0 ≤ hi)."""
    return lo * z + _half_sq_relu(z - lo) - 0.5 * max(-lo, 0.0) ** 2 - _half_sq_relu(z - hi) + 0.5 * max(-hi, 0.0) ** 2


def _inside(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # open interval, as torch's hardtanh_backward: the derivative is 0 at the corners
    return ((z > lo) & (z < hi)).to(z.dtype)


def _hardtanh_range(kw: Kw) -> tuple[float, float]:
    return float(kw.get("min_val", -1.0)), float(kw.get("max_val", 1.0))


# The f′ below copy torch's backward kernels, rounding included, so that a compiled step equals a
# torch.optim.SGD step to float64 rounding (METHOD.md's oracle), not only to float32's:
# hardsigmoid_backward multiplies by 1.0f/6.0f, a float32 constant, whatever the dtype.
_HARDSIGMOID_SLOPE = float(np.float32(1.0) / np.float32(6.0))


def _hardswish_prime(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # hardswish_backward's branches: 0 up to −3 included, z/3 + ½ inside, 1 from 3 on
    return torch.where(z <= -3, torch.zeros_like(z), torch.where(z < 3, z / 3 + 0.5, torch.ones_like(z)))


def _hardswish_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # ∫₀ᶻ t(t+3)/6 = z³/18 + z²/4 on [−3, 3]; constant 3/4 below −3; + ∫₃ᶻ t dt = (z−3)(z+3)/2 above 3
    c = torch.clamp(z, -3.0, 3.0)
    return c ** 3 / 18 + c ** 2 / 4 + 0.5 * torch.clamp(z - 3, min=0) * (z + 3)


# ------------------------------------------------ exponential family: selu, celu
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_SCALE = 1.0507009873554804934193349852946


def _selu_prime(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    return SELU_SCALE * torch.where(z > 0, torch.ones_like(z), SELU_ALPHA * torch.exp(torch.clamp(z, max=0)))


def _selu_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    m = torch.clamp(z, max=0)
    return SELU_SCALE * (_half_sq_relu(z) + SELU_ALPHA * (torch.expm1(m) - m))


def _celu_prime(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # e^{z/α}, written as torch's celu backward computes it: elu_backward with input scale 1/float32(α)
    a = float(kw.get("alpha", 1.0))
    inv = 1.0 / float(np.float32(a))
    return torch.where(z > 0, torch.ones_like(z), a * torch.exp(torch.clamp(z, max=0) * inv) * inv)


def _celu_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # ∫₀ᶻ α(e^{t/α} − 1) dt = α(α(e^{z/α} − 1) − z) for z ≤ 0
    a, m = kw.get("alpha", 1.0), torch.clamp(z, max=0)
    return _half_sq_relu(z) + a * (a * torch.expm1(m / a) - m)


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
    return _half_sq_relu(z) + c * ((F.mish(t) - torch.relu(t)) * w).sum(-1)


def _logsigmoid_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # log σ(z) = −softplus(−z), so F(z) = S(−z) − S(0) with S = −Li₂(−eᵘ) softplus's potential, S(0) = π²/12.
    return -_li2_neg_exp(-z) - math.pi ** 2 / 12


def _softmax_vjp(z, v, kw):
    s = torch.softmax(z, dim=-1)
    return s * (v - (s * v).sum(-1, keepdim=True))


TRANSFERS: dict[str, Transfer] = {
    "identity": _elementwise(lambda z, kw: z, lambda z, kw: torch.ones_like(z), lambda z, kw: 0.5 * z * z),
    "relu": _elementwise(lambda z, kw: torch.relu(z), lambda z, kw: (z > 0).to(z.dtype), _relu_F),
    "leaky_relu": _elementwise(
        lambda z, kw: F.leaky_relu(z, kw.get("negative_slope", 0.01)),
        lambda z, kw: torch.where(z > 0, torch.ones_like(z), torch.full_like(z, kw.get("negative_slope", 0.01))),
        lambda z, kw: _relu_F(z, kw, kw.get("negative_slope", 0.01)),
    ),
    "tanh": _elementwise(lambda z, kw: torch.tanh(z), lambda z, kw: 1 - torch.tanh(z) ** 2,
                         lambda z, kw: torch.abs(z) + F.softplus(-2 * torch.abs(z)) - math.log(2.0)),
    "sigmoid": _elementwise(lambda z, kw: torch.sigmoid(z),
                            lambda z, kw: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
                            lambda z, kw: z + F.softplus(-z)),
    "softplus": _elementwise(
        _softplus,
        lambda z, kw: torch.sigmoid(kw.get("beta", 1.0) * z) * (kw.get("beta", 1.0) * z <= kw.get("threshold", 20.0))
        + (kw.get("beta", 1.0) * z > kw.get("threshold", 20.0)).to(z.dtype),
        _softplus_F,
    ),
    "elu": _elementwise(
        lambda z, kw: F.elu(z, kw.get("alpha", 1.0)),
        lambda z, kw: torch.where(z > 0, torch.ones_like(z), kw.get("alpha", 1.0) * torch.exp(torch.clamp(z, max=0))),
        _elu_F,
    ),
    "gelu": _elementwise(lambda z, kw: F.gelu(z, approximate=kw.get("approximate", "none")), _gelu_prime, _gelu_F),
    "silu": _elementwise(lambda z, kw: F.silu(z), _silu_prime, _silu_F),
    "arctan": _elementwise(lambda z, kw: torch.atan(z), lambda z, kw: 1 / (1 + z * z),
                           lambda z, kw: z * torch.atan(z) - 0.5 * torch.log1p(z * z)),
    "softmax": Transfer(f=lambda z, kw: torch.softmax(z, dim=-1), vjp=_softmax_vjp,
                        F=lambda z, kw: torch.logsumexp(z, dim=-1)),
    # past the paper: options are read as torch names them (F.hardtanh's min_val/max_val, F.celu's alpha)
    "hardtanh": _elementwise(
        lambda z, kw: F.hardtanh(z, *_hardtanh_range(kw)),
        lambda z, kw: _inside(z, *_hardtanh_range(kw)),
        lambda z, kw: _clamp_F(z, *_hardtanh_range(kw)),
    ),
    "relu6": _elementwise(lambda z, kw: F.relu6(z), lambda z, kw: _inside(z, 0.0, 6.0),
                          lambda z, kw: _clamp_F(z, 0.0, 6.0)),
    # hardsigmoid(z) = clamp(z + 3, 0, 6)/6
    "hardsigmoid": _elementwise(lambda z, kw: F.hardsigmoid(z),
                                lambda z, kw: _inside(z, -3.0, 3.0) * _HARDSIGMOID_SLOPE,
                                lambda z, kw: (_clamp_F(z + 3, 0.0, 6.0) - 4.5) / 6),
    "hardswish": _elementwise(lambda z, kw: F.hardswish(z), _hardswish_prime, _hardswish_F),
    "selu": _elementwise(lambda z, kw: F.selu(z), _selu_prime, _selu_F),
    "celu": _elementwise(lambda z, kw: F.celu(z, kw.get("alpha", 1.0)), _celu_prime, _celu_F),
    "mish": _elementwise(lambda z, kw: F.mish(z), _mish_prime, _mish_F),
    "logsigmoid": _elementwise(lambda z, kw: F.logsigmoid(z), lambda z, kw: torch.sigmoid(-z), _logsigmoid_F),
    "softsign": _elementwise(lambda z, kw: F.softsign(z), lambda z, kw: 1 / (1 + torch.abs(z)) ** 2,
                             lambda z, kw: torch.abs(z) - torch.log1p(torch.abs(z))),
}


def apply_transfer(z: torch.Tensor, name: str, kwargs: tuple = ()) -> torch.Tensor:
    """f(z), out of place: the tap pass puts this in place of a block's transfer node."""
    return TRANSFERS[name].f(z, dict(kwargs))
