"""torch.optim's SGD, Adam, AdamW and RMSprop in numpy, update for update (the outer optimizer of an exported program).

Each follows torch 2.13's single-tensor CPU implementation operation by operation, in the parameters' dtype, so a
run in numpy matches the same run in torch to float round-off. State slots carry torch's names (``step``,
``exp_avg``, ``exp_avg_sq``, ``max_exp_avg_sq``, ``momentum_buffer``, ``square_avg``, ``grad_avg``), which is how
``outer_state.npz`` of an export stores them.

Example:
    >>> import numpy as np
    >>> opt = make_numpy_optimizer("sgd", 0.1, {"momentum": 0.9})
    >>> p = {"w": np.ones(2, np.float32)}
    >>> opt.step(p, {"w": np.full(2, 0.5, np.float32)})["w"]
    array([0.95, 0.95], dtype=float32)
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np

from lwcompile.errors import ConfigError

State = dict[str, np.ndarray]
_DEFAULTS: dict[str, dict[str, Any]] = {
    "sgd": {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "amsgrad": False, "maximize": False},
    "adamw": {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 1e-2, "amsgrad": False, "maximize": False},
    "rmsprop": {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False,
                "maximize": False},
}
# torch options that change nothing on CPU in eager mode
_IGNORED = {"foreach", "fused", "capturable", "differentiable"}


def _lerp(a: np.ndarray, b: np.ndarray, w: float) -> np.ndarray:
    """torch.lerp's formula (two branches, for accuracy)."""
    return a + w * (b - a) if w < 0.5 else b - (b - a) * (1 - w)


def _sgd(p: np.ndarray, g: np.ndarray, st: State, lr: float, o: dict) -> np.ndarray:
    if o["weight_decay"] != 0:
        g = g + o["weight_decay"] * p
    if o["momentum"] != 0:
        buf = st.get("momentum_buffer")
        buf = g.copy() if buf is None else o["momentum"] * buf + (1 - o["dampening"]) * g
        st["momentum_buffer"] = buf
        g = g + o["momentum"] * buf if o["nesterov"] else buf
    return p - lr * g


def _adam(decoupled: bool) -> Callable[..., np.ndarray]:
    def update(p: np.ndarray, g: np.ndarray, st: State, lr: float, o: dict) -> np.ndarray:
        b1, b2 = o["betas"]
        step = st.get("step", np.zeros((), np.float32)) + 1
        st["step"] = np.asarray(step, np.float32)
        if o["weight_decay"] != 0:
            if decoupled:
                p = p * np.asarray(1 - lr * o["weight_decay"], p.dtype)
            else:
                g = g + o["weight_decay"] * p
        m = _lerp(st.get("exp_avg", np.zeros_like(p)), g, 1 - b1)
        v = st.get("exp_avg_sq", np.zeros_like(p)) * b2 + (1 - b2) * g * g
        st["exp_avg"], st["exp_avg_sq"] = m, v
        k = float(step)
        step_size = lr / (1 - b1 ** k)
        bc2_sqrt = (1 - b2 ** k) ** 0.5
        if o["amsgrad"]:
            v = np.maximum(st.get("max_exp_avg_sq", np.zeros_like(p)), v)
            st["max_exp_avg_sq"] = v
        denom = np.sqrt(v) / np.asarray(bc2_sqrt, p.dtype) + np.asarray(o["eps"], p.dtype)
        return p - np.asarray(step_size, p.dtype) * (m / denom)

    return update


def _rmsprop(p: np.ndarray, g: np.ndarray, st: State, lr: float, o: dict) -> np.ndarray:
    st["step"] = np.asarray(st.get("step", np.zeros((), np.float32)) + 1, np.float32)
    if o["weight_decay"] != 0:
        g = g + o["weight_decay"] * p
    alpha = o["alpha"]
    sq = st.get("square_avg", np.zeros_like(p)) * alpha + (1 - alpha) * g * g
    st["square_avg"] = sq
    if o["centered"]:
        ga = _lerp(st.get("grad_avg", np.zeros_like(p)), g, 1 - alpha)
        st["grad_avg"] = ga
        avg = np.sqrt(sq - ga * ga)
    else:
        avg = np.sqrt(sq)
    avg = avg + np.asarray(o["eps"], p.dtype)
    if o["momentum"] > 0:
        buf = st.get("momentum_buffer", np.zeros_like(p)) * o["momentum"] + g / avg
        st["momentum_buffer"] = buf
        return p - lr * buf
    return p - lr * (g / avg)


_UPDATES = {"sgd": _sgd, "adam": _adam(False), "adamw": _adam(True), "rmsprop": _rmsprop}
_ALIASES = {"momentum": ("sgd", {"momentum": 0.9})}  # lwcompile's outer "momentum" = SGD(momentum=0.9)


class NumpyOptimizer:
    """One torch.optim optimizer over named numpy parameters: ``step(params, grads) -> new params``.

    ``state[name]`` holds each parameter's slots (torch's names); ``load_state`` restores them, e.g. from an
    export's ``outer_state.npz``. ``step`` returns new arrays and leaves its arguments alone.
    """

    def __init__(self, name: str, lr: float, options: Mapping[str, Any] | None = None) -> None:
        opts = dict(options or {})
        if name in _ALIASES:
            name, extra = _ALIASES[name]
            opts = extra | opts
        if name not in _UPDATES:
            raise ConfigError(f"outer optimizer {name!r} has no numpy version; use one of "
                              f"{sorted(_UPDATES) + sorted(_ALIASES)}.")
        unknown = set(opts) - set(_DEFAULTS[name]) - _IGNORED
        if unknown:
            raise ConfigError(f"outer optimizer {name!r}: unknown option(s) {sorted(unknown)}; "
                              f"known: {sorted(_DEFAULTS[name])}.")
        self.name, self.lr = name, float(lr)
        self.options = {k: v for k, v in (_DEFAULTS[name] | opts).items() if k not in _IGNORED}
        self.state: dict[str, State] = {}

    def load_state(self, state: Mapping[str, Mapping[str, np.ndarray]]) -> None:
        self.state = {k: {s: np.array(v) for s, v in slots.items()} for k, slots in state.items()}

    def step(self, params: Mapping[str, np.ndarray], grads: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        update = _UPDATES[self.name]
        out = {}
        for name, g in grads.items():
            p = np.asarray(params[name])
            g = np.asarray(g, p.dtype)
            if self.options["maximize"]:
                g = -g
            new = update(p, g, self.state.setdefault(name, {}), self.lr, self.options)
            out[name] = np.asarray(new, p.dtype)
        return out


def make_numpy_optimizer(name: str, lr: float, options: Mapping[str, Any] | None = None) -> NumpyOptimizer:
    """The numpy twin of ``Config.outer_optimizer`` ("sgd", "momentum", "adam", "adamw", "rmsprop")."""
    return NumpyOptimizer(name, lr, options)
