"""Configuration of a compiled program. Every field is validated on construction."""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

from lwcompile.errors import ConfigError

TARGETS = ("gd_pre", "dual_md_pre", "gd_post", "md_post")
LOCAL_LOSSES = ("squared_pre", "squared_post", "matching", "dual_bregman")
INNER_OPTIMIZERS = ("gd", "momentum", "rmsprop", "rmsprop_tf1", "adam", "exact")
OUTER_OPTIMIZERS = ("sgd", "momentum", "adam", "adamw", "rmsprop", "none")
FRONTENDS = ("auto", "fx", "export")

# Which activation space each target lives in and each local loss compares in.
TARGET_SPACE = {"gd_pre": "pre", "dual_md_pre": "pre", "gd_post": "post", "md_post": "post"}
LOSS_SPACE = {"squared_pre": "pre", "dual_bregman": "pre", "squared_post": "post", "matching": "post"}
# The pairs of METHOD.md, for which T=1 plain GD equals SGD at lr η·γ.
PAIRS = {"gd_pre": "squared_pre", "dual_md_pre": "dual_bregman", "gd_post": "squared_post", "md_post": "matching"}

# Optimizer defaults where a field is left None (torch's for the torch-semantics ones, the paper's for rmsprop_tf1).
_INNER_DEFAULTS = {
    "gd": {},
    "momentum": {"momentum": 0.9},
    "rmsprop": {"momentum": 0.0, "decay": 0.99, "eps": 1e-8},
    "rmsprop_tf1": {"momentum": 0.999, "decay": 0.9, "eps": 1e-5},
    "adam": {"betas": (0.9, 0.999), "eps": 1e-8},
    "exact": {},  # a closed-form solve (passes/exact_solver.py): no options, no state; steps and inner_lr unused
}
EXACT_LOSSES = ("squared_pre",)  # local losses quadratic in the weights: what inner_optimizer="exact" can solve


@dataclass(frozen=True)
class Config:
    """How to compile and train. Defaults are the paper's LocoProp-M recipe, except that the official code's inner
    step decay lr·max(1 − k/T, 0.25) is off unless ``inner_lr_decay=True``.

    Example:
        >>> import lwcompile
        >>> cfg = lwcompile.Config(target="gd_pre", local_loss="squared_pre", steps=5, inner_optimizer="adam")
        >>> cfg.optimizer_options()["betas"]
        (0.9, 0.999)
        >>> lwcompile.Config(target="bogus")  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        lwcompile.errors.ConfigError: Config.target='bogus' ...
    """

    target: str = "md_post"
    local_loss: str = "matching"
    gamma: float = 10.0
    steps: int = 10
    inner_optimizer: str = "rmsprop_tf1"
    inner_lr: float = 1e-5
    prox: float = 0.0
    momentum: float | None = None
    decay: float | None = None
    eps: float | None = None
    betas: tuple[float, float] | None = None
    inner_lr_decay: bool = False
    outer_optimizer: str = "adam"
    outer_lr: float = 1e-3
    outer_options: tuple[tuple[str, Any], ...] = ()
    skip: tuple[str, ...] = ()
    frontend: str = "auto"
    check_finite: bool = True

    def __post_init__(self) -> None:
        _choice("target", self.target, TARGETS)
        _choice("local_loss", self.local_loss, LOCAL_LOSSES)
        _choice("inner_optimizer", self.inner_optimizer, INNER_OPTIMIZERS)
        _choice("outer_optimizer", self.outer_optimizer, OUTER_OPTIMIZERS)
        _choice("frontend", self.frontend, FRONTENDS)
        if TARGET_SPACE[self.target] != LOSS_SPACE[self.local_loss]:
            raise ConfigError(
                f"Config.target={self.target!r} gives {TARGET_SPACE[self.target]}-activation targets but "
                f"Config.local_loss={self.local_loss!r} compares {LOSS_SPACE[self.local_loss]}-activations; "
                f"use the METHOD.md pair local_loss={PAIRS[self.target]!r}."
            )
        if self.inner_optimizer == "exact" and self.local_loss not in EXACT_LOSSES:
            raise ConfigError(
                f"Config.inner_optimizer='exact' solves a quadratic local loss ({', '.join(EXACT_LOSSES)}) in closed "
                f"form; Config.local_loss={self.local_loss!r} is not quadratic in the weights. Use "
                "target='gd_pre', local_loss='squared_pre' (LocoProp-S), or an iterative inner optimizer.")
        _positive("gamma", self.gamma)
        _positive("inner_lr", self.inner_lr, allow_zero=True)  # 0 is legitimate: a warm-up phase
        _positive("outer_lr", self.outer_lr, allow_zero=True)
        _positive("prox", self.prox, allow_zero=True)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"Config.steps={self.steps!r}: the number of inner iterations T must be an int >= 1.")
        for name in ("momentum", "decay"):
            v = getattr(self, name)
            if v is not None and not (_real(v) and 0.0 <= v < 1.0 + (name == "momentum") * 0.0):
                raise ConfigError(f"Config.{name}={v!r}: must be a number in [0, 1).")
        if self.eps is not None:
            _positive("eps", self.eps)
        if self.betas is not None:
            b = tuple(self.betas)
            if len(b) != 2 or not all(_real(x) and 0.0 <= x < 1.0 for x in b):
                raise ConfigError(f"Config.betas={self.betas!r}: must be two numbers in [0, 1).")
            object.__setattr__(self, "betas", (float(b[0]), float(b[1])))
        if isinstance(self.skip, str):
            object.__setattr__(self, "skip", (self.skip,))
        object.__setattr__(self, "skip", tuple(self.skip))
        for pattern in self.skip:
            try:
                re.compile(pattern)
            except (re.error, TypeError) as e:
                raise ConfigError(f"Config.skip entry {pattern!r} is not a valid regular expression ({e}); skip "
                                  "takes regexes matched against block names and module class names, e.g. "
                                  r"skip=(r'^head\.', 'Embedding').") from e
        if isinstance(self.outer_options, dict):
            object.__setattr__(self, "outer_options", tuple(sorted(self.outer_options.items())))

    def optimizer_options(self) -> dict[str, Any]:
        """The inner optimizer's options with its defaults filled in."""
        opts = dict(_INNER_DEFAULTS[self.inner_optimizer])
        for key in opts:
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        return opts

    def replace(self, **changes: Any) -> "Config":
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(f"Config.{name}={value!r} is not one of {', '.join(map(repr, allowed))}.")


def _real(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(name: str, v: Any, allow_zero: bool = False) -> None:
    if not _real(v) or v < 0 or (v == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"Config.{name}={v!r}: must be a finite number {bound}.")
