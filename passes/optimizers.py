"""Inner optimizers as pairs of pure functions over tuples of tensors (optax's init/update).

``init(params) -> state`` and ``update(grads, state, params, lr) -> (new_params, new_state)``; nothing is
mutated, so an inner loop built from them traces with torch.fx and exports to ONNX unchanged. ``state``
is a flat tuple of tensors (slot-major: every param's first slot, then every param's second, ...).

Example:
    >>> import torch
    >>> opt = make_optimizer("gd", {})
    >>> (w,), _ = opt.update((torch.tensor([1.0]),), opt.init((torch.tensor([3.0]),)), (torch.tensor([3.0]),), 0.5)
    >>> w
    tensor([2.5000])
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch

Tensors = tuple[torch.Tensor, ...]


class InnerOptimizer(NamedTuple):
    name: str
    slots: int  # state tensors per parameter (Adam adds one shared step counter)
    init: Callable[[Tensors], Tensors]
    update: Callable[[Tensors, Tensors, Tensors, Any], tuple[Tensors, Tensors]]


def _gd(opts: dict) -> InnerOptimizer:
    return InnerOptimizer("gd", 0, lambda ps: (), lambda gs, st, ps, lr: (tuple(p - lr * g for p, g in zip(ps, gs)), ()))


def _momentum(opts: dict) -> InnerOptimizer:
    mu = opts["momentum"]

    def update(gs, st, ps, lr):  # torch.optim.SGD(momentum=μ, dampening=0): buf ← μ buf + g
        bufs = tuple(mu * b + g for b, g in zip(st, gs))
        return tuple(p - lr * b for p, b in zip(ps, bufs)), bufs

    return InnerOptimizer("momentum", 1, lambda ps: tuple(torch.zeros_like(p) for p in ps), update)


def _rmsprop(opts: dict) -> InnerOptimizer:
    rho, mu, eps = opts["decay"], opts["momentum"], opts["eps"]
    n_slots = 2 if mu > 0 else 1

    def init(ps):
        return tuple(torch.zeros_like(p) for p in ps) * n_slots

    def update(gs, st, ps, lr):  # torch.optim.RMSprop semantics: eps outside the root, ms starts at 0
        n = len(ps)
        ms = tuple(rho * v + (1 - rho) * g * g for v, g in zip(st[:n], gs))
        steps = tuple(g / (torch.sqrt(v) + eps) for g, v in zip(gs, ms))
        if mu > 0:
            bufs = tuple(mu * b + s for b, s in zip(st[n:], steps))
            return tuple(p - lr * b for p, b in zip(ps, bufs)), ms + bufs
        return tuple(p - lr * s for p, s in zip(ps, steps)), ms

    return InnerOptimizer("rmsprop", n_slots, init, update)


def _rmsprop_tf1(opts: dict) -> InnerOptimizer:
    rho, mu, eps = opts["decay"], opts["momentum"], opts["eps"]

    def init(ps):  # TF1: the mean-square slot starts at one
        return tuple(torch.ones_like(p) for p in ps) + tuple(torch.zeros_like(p) for p in ps)

    def update(gs, st, ps, lr):  # ε inside the root; momentum accumulates the lr-scaled step
        n = len(ps)
        ms = tuple(rho * v + (1 - rho) * g * g for v, g in zip(st[:n], gs))
        mom = tuple(mu * m + lr * g / torch.sqrt(v + eps) for m, g, v in zip(st[n:], gs, ms))
        return tuple(p - m for p, m in zip(ps, mom)), ms + mom

    return InnerOptimizer("rmsprop_tf1", 2, init, update)


def _adam(opts: dict) -> InnerOptimizer:
    b1, b2 = opts["betas"]
    eps = opts["eps"]

    def init(ps):
        zeros = tuple(torch.zeros_like(p) for p in ps)
        return zeros + zeros + (torch.zeros((), dtype=ps[0].dtype, device=ps[0].device),)

    def update(gs, st, ps, lr):  # torch.optim.Adam semantics (bias-corrected, eps outside the root)
        n = len(ps)
        t = st[-1] + 1
        m = tuple(b1 * a + (1 - b1) * g for a, g in zip(st[:n], gs))
        v = tuple(b2 * a + (1 - b2) * g * g for a, g in zip(st[n:2 * n], gs))
        c1 = 1 - b1 ** t
        c2 = 1 - b2 ** t
        new = tuple(p - lr * (mi / c1) / (torch.sqrt(vi / c2) + eps) for p, mi, vi in zip(ps, m, v))
        return new, m + v + (t,)

    return InnerOptimizer("adam", 2, init, update)


def _exact(opts: dict) -> InnerOptimizer:
    def update(gs, st, ps, lr):  # never called: passes/exact_solver.py replaces the whole inner loop
        raise NotImplementedError("inner_optimizer='exact' has no iterative update; see passes/exact_solver.py")

    return InnerOptimizer("exact", 0, lambda ps: (), update)


_REGISTRY = {"exact": _exact, "gd": _gd, "momentum": _momentum, "rmsprop": _rmsprop, "rmsprop_tf1": _rmsprop_tf1, "adam": _adam}


def make_optimizer(name: str, opts: dict[str, Any]) -> InnerOptimizer:
    """The inner optimizer `name` ("gd", "momentum", "rmsprop", "rmsprop_tf1", "adam") with its options."""
    return _REGISTRY[name](opts)
