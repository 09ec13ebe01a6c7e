"""Targets and local losses of METHOD.md, as closed forms.

``make_target(kind, ...)`` builds a block's target from its forward values and the task-loss gradients.
``residual(loss, transfer, kw, z, target)`` is ∂local/∂z, the only thing an inner step needs: the weight
gradient is then the linear op's weight-VJP of it (see :mod:`lwcompile.passes.linear_ops`).
``value(loss, ...)`` reports the local loss itself (matching and dual Bregman up to a constant in z).
Each target kind is one ``TargetRule`` and each local loss one ``LossRule`` (with its activation space and ONNX
form); :mod:`lwcompile.config` validates against these rows, and ONNX training artifacts read their ``onnx`` forms.

Example:
    >>> import torch
    >>> z, a = torch.tensor([1.0, 2.0]), torch.tensor([0.5, 2.5])
    >>> residual("squared_pre", "identity", {}, z, a)
    tensor([ 0.5000, -0.5000])
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import torch

from lwcompile.passes.transfer import TRANSFERS, Kw


class TargetRule(NamedTuple):
    """One target kind: ``make(â, ŷ, ∂L/∂â, ∂L/∂ŷ, γ) -> target``, the activation space ("pre" or "post") the
    target lives in, and METHOD.md's local loss for it (``pair``: with T=1 plain GD, one step equals SGD)."""

    make: Callable[..., torch.Tensor]
    space: str
    pair: str
    # the target's offset from its base (â or ŷ): base − target = γ·g, formed from the gradient alone, so it keeps
    # float rounding relative to γ·g, where base − target recomputed from the stored target loses eps·|base|
    offset: Callable[..., torch.Tensor] | None = None

    def __call__(self, a_hat, y_hat, g_pre, g_post, gamma) -> torch.Tensor:
        return self.make(a_hat, y_hat, g_pre, g_post, gamma)


class LossRule(NamedTuple):
    """One local loss: its residual ∂local/∂z and summed value ``(row, kw, z, a) -> tensor``, the activation space
    it compares in, and its ONNX form for training artifacts: ``onnx(g, f, F, z, a) -> name`` (f, F: the transfer's
    ONNX builders applied to a value) and which of the transfer row's builders it needs (``onnx_needs``)."""

    residual: Callable[..., torch.Tensor]
    value: Callable[..., torch.Tensor]
    space: str
    onnx: Callable[..., str]
    onnx_needs: tuple[str, ...]
    # ∂local/∂z from u = s(z) − target (s = identity in "pre" space, f in "post" space): what the inner graph
    # computes in the offset form, where u = (s(z) − s(z₀)) + offset is formed without the target itself
    from_u: Callable[..., torch.Tensor] | None = None


# METHOD.md step 3, one row per target kind: (â, ŷ, ∂L/∂â, ∂L/∂ŷ, γ) -> target
TARGET_RULES = {
    "gd_pre": TargetRule(lambda a_hat, y_hat, g_pre, g_post, gamma: a_hat - gamma * g_pre, "pre", "squared_pre",
                         lambda g_pre, g_post, gamma: gamma * g_pre),
    "dual_md_pre": TargetRule(lambda a_hat, y_hat, g_pre, g_post, gamma: a_hat - gamma * g_post, "pre", "dual_bregman",
                              lambda g_pre, g_post, gamma: gamma * g_post),
    "gd_post": TargetRule(lambda a_hat, y_hat, g_pre, g_post, gamma: y_hat - gamma * g_post, "post", "squared_post",
                          lambda g_pre, g_post, gamma: gamma * g_post),
    "md_post": TargetRule(lambda a_hat, y_hat, g_pre, g_post, gamma: y_hat - gamma * g_pre, "post", "matching",
                          lambda g_pre, g_post, gamma: gamma * g_pre),
}

# METHOD.md step 4, one row per local loss: (residual ∂local/∂z, the summed value, ...). Matching: Σ F(z) − yᵀz drops
# the constant F(a) − yᵀa; dual Bregman: Σ (z − a)ᵀf(z) − F(z) drops F(a); both have the residual as exact gradient.
# The ONNX forms are summed over every element and keep every constant (their z-gradient is the same residual).
LOSS_RULES = {
    "squared_pre": LossRule(lambda t, kw, z, a: z - a,
                            lambda t, kw, z, a: 0.5 * ((z - a) ** 2).sum(), "pre",
                            lambda g, f, F, z, a: g.total(g.half_square(g("Sub", z, a))), (),  # ½Σ(z − a)²
                            lambda t, kw, z, u: u),
    "squared_post": LossRule(lambda t, kw, z, a: t.vjp(z, t.f(z, kw) - a, kw),
                             lambda t, kw, z, a: 0.5 * ((t.f(z, kw) - a) ** 2).sum(), "post",
                             lambda g, f, F, z, a: g.total(g.half_square(g("Sub", f(z), a))),  # ½Σ(f(z) − a)²
                             ("onnx_f",), lambda t, kw, z, u: t.vjp(z, u, kw)),
    "matching": LossRule(lambda t, kw, z, a: t.f(z, kw) - a,
                         lambda t, kw, z, a: t.F(z, kw).sum() - (a * z).sum(), "post",
                         lambda g, f, F, z, a: g("Sub", g.total(F(z)), g.total(g("Mul", a, z))),  # ΣF(z) − Σ a·z
                         ("onnx_F",), lambda t, kw, z, u: u),
    # f′(z)(z − a); the softmax Jacobian is symmetric, so its vjp is this product too
    "dual_bregman": LossRule(lambda t, kw, z, a: t.vjp(z, z - a, kw),
                             lambda t, kw, z, a: ((z - a) * t.f(z, kw)).sum() - t.F(z, kw).sum(), "pre",
                             # Σ[f(z)(z − a) − F(z) + F(a)]
                             lambda g, f, F, z, a: g("Add", g.total(g("Sub", g("Mul", f(z), g("Sub", z, a)), F(z))),
                                                     g.total(F(a))),
                             ("onnx_f", "onnx_F"), lambda t, kw, z, u: t.vjp(z, u, kw)),
}


def _rule(table: dict, kind: str, what: str):
    if kind not in table:
        raise ValueError(f"unknown {what} {kind!r}; known: {sorted(table)}")
    return table[kind]


def make_target(kind: str, gamma: float, a_hat: torch.Tensor, y_hat: torch.Tensor,
                g_pre: torch.Tensor, g_post: torch.Tensor) -> torch.Tensor:
    """The table of METHOD.md step 3 (g_pre = ∂L/∂â, g_post = ∂L/∂ŷ)."""
    return _rule(TARGET_RULES, kind, "target kind")(a_hat, y_hat, g_pre, g_post, gamma)


def make_offset(kind: str, gamma: float, g_pre: torch.Tensor, g_post: torch.Tensor) -> torch.Tensor:
    """The target's offset base − target (γ·∂L/∂â or γ·∂L/∂ŷ by target kind), from the gradient alone."""
    return _rule(TARGET_RULES, kind, "target kind").offset(g_pre, g_post, gamma)


def residual_from_offset(loss: str, transfer: str, kw: Kw, z: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
    """∂ local(z, target) / ∂z from u = s(z) − target (see :class:`LossRule`); ``z`` may be None for losses
    that do not read it (squared_pre)."""
    return _rule(LOSS_RULES, loss, "local loss").from_u(TRANSFERS[transfer], kw, z, u)


def needs_z(loss: str) -> bool:
    """Whether the offset-form residual of ``loss`` reads z (for f or f′): all but the squared pre-activation loss."""
    return loss != "squared_pre"


def residual(loss: str, transfer: str, kw: Kw, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """∂ local(z, target) / ∂z, summed-loss convention (no 1/N)."""
    return _rule(LOSS_RULES, loss, "local loss").residual(TRANSFERS[transfer], kw, z, target)


def value(loss: str, transfer: str, kw: Kw, z: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The local loss summed over the batch (up to a constant in z for matching and dual Bregman)."""
    return _rule(LOSS_RULES, loss, "local loss").value(TRANSFERS[transfer], kw, z, target)
