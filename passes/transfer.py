"""Transfer functions f of METHOD.md: the function, its vector-Jacobian product, and F with F′ = f.

One row per function in ``TRANSFERS``. ``vjp(z, v)`` is f′(z)ᵀv (element-wise f′(z) ⊙ v; for softmax
the symmetric Jacobian product). ``F(z)`` is the convex integral used only to *report* matching-loss
values; the inner updates never need it, nor f⁻¹.

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

import torch
import torch.nn.functional as F

Kw = dict[str, Any]


@dataclass(frozen=True)
class Transfer:
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
}


def F_sum(name: str, z: torch.Tensor, kw: Kw) -> torch.Tensor:
    """Σ F(z) over every element (softmax: over every row), the matching loss's potential."""
    return TRANSFERS[name].F(z, kw).sum()


def apply_transfer(z: torch.Tensor, name: str, kwargs: tuple = ()) -> torch.Tensor:
    """f(z), out of place: the tap pass puts this in place of a block's transfer node."""
    return TRANSFERS[name].f(z, dict(kwargs))
