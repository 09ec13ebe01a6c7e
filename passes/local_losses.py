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


# METHOD.md step 3, one row per target kind: (â, ŷ, ∂L/∂â, ∂L/∂ŷ, γ) -> target
TARGET_RULES = {
    "gd_pre": lambda a_hat, y_hat, g_pre, g_post, gamma: a_hat - gamma * g_pre,
    "dual_md_pre": lambda a_hat, y_hat, g_pre, g_post, gamma: a_hat - gamma * g_post,
    "gd_post": lambda a_hat, y_hat, g_pre, g_post, gamma: y_hat - gamma * g_post,
    "md_post": lambda a_hat, y_hat, g_pre, g_post, gamma: y_hat - gamma * g_pre,
}

# METHOD.md step 4, one row per local loss: (residual ∂local/∂z, the summed value). Matching: Σ F(z) − yᵀz drops
# the constant F(a) − yᵀa; dual Bregman: Σ (z − a)ᵀf(z) − F(z) drops F(a); both have the residual as exact gradient.
LOSS_RULES = {
    "squared_pre": (lambda t, kw, z, a: z - a,
                    lambda t, kw, z, a: 0.5 * ((z - a) ** 2).sum()),
    "squared_post": (lambda t, kw, z, a: t.vjp(z, t.f(z, kw) - a, kw),
                     lambda t, kw, z, a: 0.5 * ((t.f(z, kw) - a) ** 2).sum()),
    "matching": (lambda t, kw, z, a: t.f(z, kw) - a,
                 lambda t, kw, z, a: t.F(z, kw).sum() - (a * z).sum()),
    # f′(z)(z − a); the softmax Jacobian is symmetric, so its vjp is this product too
    "dual_bregman": (lambda t, kw, z, a: t.vjp(z, z - a, kw),
                     lambda t, kw, z, a: ((z - a) * t.f(z, kw)).sum() - t.F(z, kw).sum()),
}


def _rule(table: dict, kind: str, what: str):
    if kind not in table:
        raise ValueError(f"unknown {what} {kind!r}; known: {sorted(table)}")
    return table[kind]


def make_target(kind: str, gamma: float, a_hat: torch.Tensor, y_hat: torch.Tensor,
                g_pre: torch.Tensor, g_post: torch.Tensor) -> torch.Tensor:
    """The table of METHOD.md step 3 (g_pre = ∂L/∂â, g_post = ∂L/∂ŷ)."""
    return _rule(TARGET_RULES, kind, "target kind")(a_hat, y_hat, g_pre, g_post, gamma)


def residual(loss: str, transfer: str, kw: Kw, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∂ local(z, target) / ∂z, summed-loss convention (no 1/N)."""
    return _rule(LOSS_RULES, loss, "local loss")[0](TRANSFERS[transfer], kw, z, target)


def value(loss: str, transfer: str, kw: Kw, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The local loss summed over the batch (up to a constant in z for matching and dual Bregman)."""
    return _rule(LOSS_RULES, loss, "local loss")[1](TRANSFERS[transfer], kw, z, target)
