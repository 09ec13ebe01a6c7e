"""The outer optimizer: a ``torch.optim`` optimizer over the non-block parameters, addressed by parameter name.

One factory for every place that needs a torch optimizer by name (the Program, the examples and the benchmarks'
backprop baselines), and :class:`OuterOptimizer`, which keeps the optimizer together with the names of the tensors
it steps so its state can be read, carried over to new tensors (after a re-trace) and saved by name.

Example:
    >>> import torch
    >>> w = torch.nn.Parameter(torch.ones(2))
    >>> opt = OuterOptimizer.build("sgd", {"w": w}, lr=0.5)
    >>> opt.step({"w": torch.ones(2)})
    >>> w.detach()
    tensor([0.5000, 0.5000])
"""
from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch

from lwcompile.errors import ConfigError

_FACTORIES = {
    "sgd": lambda ps, lr, kw: torch.optim.SGD(ps, lr=lr, **kw),
    "momentum": lambda ps, lr, kw: torch.optim.SGD(ps, lr=lr, **({"momentum": 0.9} | kw)),
    "adam": lambda ps, lr, kw: torch.optim.Adam(ps, lr=lr, **kw),
    "adamw": lambda ps, lr, kw: torch.optim.AdamW(ps, lr=lr, **kw),
    "rmsprop": lambda ps, lr, kw: torch.optim.RMSprop(ps, lr=lr, **kw),
}


def make_torch_optimizer(name: str, params: Iterable[torch.Tensor], lr: float,
                         options: Mapping[str, Any] | None = None) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer ``name`` ("sgd", "momentum", "adam", "adamw", "rmsprop") over ``params``."""
    if name not in _FACTORIES:
        raise ConfigError(f"optimizer {name!r} is not one of {', '.join(map(repr, _FACTORIES))}.")
    try:
        return _FACTORIES[name](list(params), lr, dict(options or {}))
    except TypeError as e:
        raise ConfigError(f"options {dict(options or {})!r} rejected by optimizer {name!r}: {e}") from e


class OuterOptimizer:
    """A torch optimizer plus the parameter names it steps, in order."""

    def __init__(self, names: tuple[str, ...], optimizer: torch.optim.Optimizer) -> None:
        self.names = names
        self.optimizer = optimizer

    @classmethod
    def build(cls, name: str, params: Mapping[str, torch.Tensor], lr: float,
              options: Mapping[str, Any] | None = None) -> "OuterOptimizer | None":
        """None when there is nothing to step (no parameters, or ``name == "none"``)."""
        if not params or name == "none":
            return None
        return cls(tuple(params), make_torch_optimizer(name, params.values(), lr, options))

    @property
    def _params(self) -> list[torch.Tensor]:
        return self.optimizer.param_groups[0]["params"]

    def step(self, grads: Mapping[str, torch.Tensor]) -> None:
        """One step with these gradients (parameters without one are skipped, as torch optimizers do)."""
        by_name = dict(zip(self.names, self._params))
        for n, g in grads.items():
            by_name[n].grad = g
        try:
            self.optimizer.step()
        finally:
            self.optimizer.zero_grad(set_to_none=True)

    def state_by_name(self) -> dict[str, dict[str, Any]]:
        """Parameter name -> its optimizer slots (``exp_avg``, ``momentum_buffer``, ``step``, ...)."""
        return {n: dict(self.optimizer.state[p]) for n, p in zip(self.names, self._params) if p in self.optimizer.state}

    def adopt(self, previous: "OuterOptimizer | None") -> None:
        """Take over ``previous``'s state for the names both step (a replaced tensor keeps its predecessor's)."""
        if previous is None:
            return
        old = previous.state_by_name()
        for n, p in zip(self.names, self._params):
            if n in old:
                self.optimizer.state[p] = old[n]

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(sd)
        self.optimizer.zero_grad(set_to_none=True)
