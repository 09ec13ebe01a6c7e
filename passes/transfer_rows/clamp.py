"""The clamp family, one row each: hardtanh, relu6, hardsigmoid, hardswish (mobile nets).

Options are read as torch names them (F.hardtanh's min_val / max_val). The f′ copy torch's backward kernels,
rounding included, so that a compiled step equals a torch.optim.SGD step to float64 rounding (METHOD.md's oracle).

Example:
    >>> import torch
    >>> row = next(r for r in ROWS if r.name == "relu6")
    >>> row.F(torch.tensor([7.0]), {})  # ∫₀⁷ clamp(t, 0, 6) dt = 18 + 6
    tensor([24.])
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lwcompile.passes.transfer_rows.row import Kw, TransferRow, elementwise

if TYPE_CHECKING:  # ONNX builders only call its methods: onnx is not imported to define a row
    from lwcompile.passes.onnx_nodes import OnnxNodes

aten = torch.ops.aten


def half_sq_relu(u: torch.Tensor) -> torch.Tensor:
    """½ relu(u)²."""
    return 0.5 * torch.clamp(u, min=0) ** 2


def _clamp_F(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    """∫₀ᶻ clamp(t, lo, hi) dt, from clamp(t) = lo + relu(t − lo) − relu(t − hi) (any lo ≤ hi, not only lo ≤ 0 ≤ hi)."""
    return lo * z + half_sq_relu(z - lo) - 0.5 * max(-lo, 0.0) ** 2 - half_sq_relu(z - hi) + 0.5 * max(-hi, 0.0) ** 2


def _clamp_potential(g: OnnxNodes, t: str, lo: float, hi: float) -> str:
    """:func:`_clamp_F` as ONNX nodes: lo·t + ½relu(t − lo)² − ½relu(t − hi)² + const."""
    c = -0.5 * max(-lo, 0.0) ** 2 + 0.5 * max(-hi, 0.0) ** 2
    quad = g("Sub", g.half_square(g("Relu", g.shift(t, -lo))), g.half_square(g("Relu", g.shift(t, -hi))))
    return g.shift(g("Add", g.scale(t, lo), quad), c)


def _inside(z: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    # open interval, as torch's hardtanh_backward: the derivative is 0 at the corners
    return ((z > lo) & (z < hi)).to(z.dtype)


def _hardtanh_range(kw: Kw) -> tuple[float, float]:
    return float(kw.get("min_val", -1.0)), float(kw.get("max_val", 1.0))


# hardsigmoid_backward multiplies by 1.0f/6.0f, a float32 constant, whatever the dtype.
_HARDSIGMOID_SLOPE = float(np.float32(1.0) / np.float32(6.0))


def _hardswish_prime(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # hardswish_backward's branches: 0 up to −3 included, z/3 + ½ inside, 1 from 3 on
    return torch.where(z <= -3, torch.zeros_like(z), torch.where(z < 3, z / 3 + 0.5, torch.ones_like(z)))


def _hardswish_F(z: torch.Tensor, kw: Kw) -> torch.Tensor:
    # ∫₀ᶻ t(t+3)/6 = z³/18 + z²/4 on [−3, 3]; constant 3/4 below −3; + ∫₃ᶻ t dt = (z−3)(z+3)/2 above 3
    c = torch.clamp(z, -3.0, 3.0)
    return c ** 3 / 18 + c ** 2 / 4 + 0.5 * torch.clamp(z - 3, min=0) * (z + 3)


def _hardswish_potential(g: OnnxNodes, t: str) -> str:
    """:func:`_hardswish_F` as ONNX nodes: c³/18 + c²/4 + ½relu(t − 3)(t + 3) with c = clamp(t, −3, 3)."""
    c = g.clamp(t, -3.0, 3.0)
    c2 = g("Mul", c, c)
    inner = g("Add", g.scale(g("Mul", c2, c), 1 / 18), g.scale(c2, 0.25))
    return g("Add", inner, g.scale(g("Mul", g("Relu", g.shift(t, -3.0)), g.shift(t, 3.0)), 0.5))


ROWS: tuple[TransferRow, ...] = (
    elementwise("hardtanh", lambda z, kw: F.hardtanh(z, *_hardtanh_range(kw)),
                lambda z, kw: _inside(z, *_hardtanh_range(kw)), lambda z, kw: _clamp_F(z, *_hardtanh_range(kw)),
                options=("min_val", "max_val"), modules=(nn.Hardtanh,), functions=(F.hardtanh,),
                aten=(aten.hardtanh.default,), onnx_f=lambda g, t, kw: g.clamp(t, *_hardtanh_range(kw)),
                onnx_F=lambda g, t, kw: _clamp_potential(g, t, *_hardtanh_range(kw))),
    # nn.ReLU6 subclasses nn.Hardtanh; modules match by exact type, so it has its own row
    elementwise("relu6", lambda z, kw: F.relu6(z), lambda z, kw: _inside(z, 0.0, 6.0),
                lambda z, kw: _clamp_F(z, 0.0, 6.0),
                modules=(nn.ReLU6,), functions=(F.relu6,), aten=(aten.relu6.default,),
                onnx_f=lambda g, t, kw: g.clamp(t, 0.0, 6.0), onnx_F=lambda g, t, kw: _clamp_potential(g, t, 0.0, 6.0)),
    # hardsigmoid(z) = clamp(z + 3, 0, 6)/6
    elementwise("hardsigmoid", lambda z, kw: F.hardsigmoid(z),
                lambda z, kw: _inside(z, -3.0, 3.0) * _HARDSIGMOID_SLOPE,
                lambda z, kw: (_clamp_F(z + 3, 0.0, 6.0) - 4.5) / 6,
                modules=(nn.Hardsigmoid,), functions=(F.hardsigmoid,), aten=(aten.hardsigmoid.default,),
                onnx_f=lambda g, t, kw: g.scale(g.clamp(g.shift(t, 3.0), 0.0, 6.0), 1 / 6),
                onnx_F=lambda g, t, kw: g.scale(g.shift(_clamp_potential(g, g.shift(t, 3.0), 0.0, 6.0), -4.5), 1 / 6)),
    elementwise("hardswish", lambda z, kw: F.hardswish(z), _hardswish_prime, _hardswish_F,
                modules=(nn.Hardswish,), functions=(F.hardswish,), aten=(aten.hardswish.default,),
                onnx_f=lambda g, t, kw: g("Mul", t, g.scale(g.clamp(g.shift(t, 3.0), 0.0, 6.0), 1 / 6)),
                onnx_F=lambda g, t, kw: _hardswish_potential(g, t)),
)
