"""``lwcompile.transform``: the public entry point."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from lwcompile.config import Config
from lwcompile.errors import ConfigError
from lwcompile.ir import as_tuple
from lwcompile.program import Program


def transform(model: nn.Module, loss_fn: Callable[..., torch.Tensor], example_inputs: Any,
              config: Config | None = None, example_labels: Any = None, **overrides: Any) -> Program:
    """Compile ``model`` for layer-wise local-loss training.

    ``loss_fn(output, *labels)`` returns the scalar task loss; ``example_inputs`` is a tensor or a tuple of
    the model's positional inputs (used for tracing and shapes); ``overrides`` change fields of ``config``.
    ``example_labels`` (a tensor or a tuple of them, kept as ``prog.example_labels``) are what
    ``prog.export_onnx`` traces the target graph for when it is not given labels itself; for PyTorch's standard
    losses (MSE, L1, BCE, cross-entropy, ...) they are inferred (:mod:`lwcompile.labels`).

    Example:
        >>> import torch, lwcompile
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> prog = lwcompile.transform(model, torch.nn.functional.cross_entropy, torch.randn(32, 4), steps=5)
        >>> loss = prog.step(torch.randn(32, 4), torch.randint(0, 3, (32,)))
        >>> [b.transfer for b in prog.blocks]
        ['relu', 'identity']
    """
    if not isinstance(model, nn.Module):
        raise ConfigError(f"transform() needs an nn.Module, got {type(model).__name__}.")
    if not callable(loss_fn):
        raise ConfigError(f"loss_fn must be callable as loss_fn(output, *labels), got {type(loss_fn).__name__}.")
    config = config or Config()
    if not isinstance(config, Config):
        raise ConfigError(f"config must be an lwcompile.Config, got {type(config).__name__}.")
    if overrides:
        unknown = set(overrides) - set(Config.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown Config field(s) {sorted(unknown)}; known: {sorted(Config.__dataclass_fields__)}.")
        config = config.replace(**overrides)
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
    labels = None if example_labels is None else as_tuple(example_labels)
    if labels is not None and not all(isinstance(t, torch.Tensor) for t in labels):
        raise ConfigError("example_labels must be a tensor or a tuple of tensors (the labels loss_fn takes), got "
                          f"{[type(t).__name__ for t in labels]}.")
    prog = Program(model, loss_fn, inputs, config)
    prog.example_labels = labels
    return prog
