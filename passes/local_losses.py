"""Targets and local losses of METHOD.md, as closed forms.

``make_target(kind, ...)`` builds a block's target from its forward values and the task-loss gradients.
``residual(loss, transfer, kw, z, target)`` is ∂local/∂z, the only thing an inner step needs: the weight
gradient is then the linear op's weight-VJP of it (see :mod:`lwcompile.passes.linear_ops`).
``value(loss, ...)`` reports the local loss itself (matching and dual Bregman up to a constant in z).

Example:
    >>> import torch
    >>> z, a = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])
    >>> residual("squared_pre", "identity", {}, z, a)
    tensor([ 0.5000, -0.5000])
"""
from __future__ import annotations

import torch

from lwcompile.passes.transfer import TRANSFERS, Kw


def make_target(kind: str, gamma: float, a_hat: torch.Tensor, y_hat: torch.Tensor,
                g_pre: torch.Tensor, g_post: torch.Tensor) -> torch.Tensor:
    """The table of METHOD.md step 3 (g_pre = ∂L/∂â, g_post = ∂L/∂ŷ)."""
    if kind == "gd_pre":
        return a_hat - gamma * g_pre
    if kind == "dual_md_pre":
        return a_hat - gamma * g_post
    if kind == "gd_post":
        return y_hat - gamma * g_post
    if kind == "md_post":
        return y_hat - gamma * g_pre
    raise ValueError(f"unknown target kind {kind!r}")


def residual(loss: str, transfer: str, kw: Kw, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∂ local(z, target) / ∂z, summed-loss convention (no 1/N)."""
    t = TRANSFERS[transfer]
    if loss == "squared_pre":
        return z - target
    if loss == "matching":
        return t.f(z, kw) - target
    if loss == "squared_post":
        return t.vjp(z, t.f(z, kw) - target, kw)
    if loss == "dual_bregman":
        return t.vjp(z, z - target, kw)  # f′(z)(z − a); the softmax Jacobian is symmetric
    raise ValueError(f"unknown local loss {loss!r}")


def value(loss: str, transfer: str, kw: Kw, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The local loss summed over the batch. Matching: Σ F(z) − yᵀz (drops the constant F(a) − yᵀa);
    dual Bregman: Σ (z − a)ᵀf(z) − F(z) (drops F(a)); both have ``residual`` as their exact gradient."""
    t = TRANSFERS[transfer]
    if loss == "squared_pre":
        return 0.5 * ((z - target) ** 2).sum()
    if loss == "squared_post":
        return 0.5 * ((t.f(z, kw) - target) ** 2).sum()
    if loss == "matching":
        return t.F(z, kw).sum() - (target * z).sum()
    if loss == "dual_bregman":
        return ((z - target) * t.f(z, kw)).sum() - t.F(z, kw).sum()
    raise ValueError(f"unknown local loss {loss!r}")
