"""``MODULE:FACTORY`` specs of the command line: import a module (or a .py file) and call a model factory.

A factory returns ``(model, example_inputs)``, optionally followed by ``loss_fn`` and ``example_labels``.

Example:
    >>> model, inputs, loss, labels = load_factory("lwcompile.cli:demo_factory")
    >>> type(model).__name__, inputs[0].shape, loss, labels
    ('Sequential', torch.Size([32, 8]), None, None)
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from typing import Any, Callable

from torch import nn

from lwcompile.errors import ConfigError
from lwcompile.ir import as_tuple


def import_module_or_file(name: str) -> Any:
    """Import an importable module name, or execute a path to a ``.py`` file as a module."""
    if name.endswith(".py") or "/" in name or os.sep in name:
        if not os.path.isfile(name):
            raise ConfigError(f"no file {name!r}.")
        mod_name = "_lwcompile_factory_" + os.path.splitext(os.path.basename(name))[0]
        spec = importlib.util.spec_from_file_location(mod_name, name)
        module = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = module
        spec.loader.exec_module(module)
        return module
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # like `python -m`: modules in the current directory are found
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        raise ConfigError(f"cannot import module {name!r} ({e}); pass an importable module or a path to a "
                          ".py file.") from e


def load_factory(spec: str) -> tuple[nn.Module, tuple, Callable | None, tuple | None]:
    """Import ``MODULE:FACTORY``, call it, check the result: (model, inputs, loss_fn or None, labels or None)."""
    module_name, sep, attr = spec.rpartition(":")
    if not sep or not module_name or not attr:
        raise ConfigError(f"{spec!r}: expected MODULE:FACTORY, e.g. mypkg.models:build or path/to/models.py:build.")
    factory = getattr(import_module_or_file(module_name), attr, None)
    if not callable(factory):
        raise ConfigError(f"{module_name!r} has no callable {attr!r}; FACTORY must be a function returning "
                          "(model, example_inputs[, loss_fn[, example_labels]]).")
    out = factory()
    if not isinstance(out, (tuple, list)) or not 2 <= len(out) <= 4:
        raise ConfigError(f"{spec}() returned {type(out).__name__}; it must return (model, example_inputs), "
                          "(model, example_inputs, loss_fn) or (model, example_inputs, loss_fn, example_labels).")
    model, inputs, loss, labels = (*out, None, None)[:4]
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{spec}() returned a {type(model).__name__} as the model; expected an nn.Module.")
    if loss is not None and not callable(loss):
        raise ConfigError(f"{spec}() returned a non-callable loss_fn ({type(loss).__name__}).")
    return model, as_tuple(inputs), loss, None if labels is None else as_tuple(labels)


def parse_devices(text: str) -> int | list[str]:
    """``2`` (simulated devices) or ``cuda:0,cuda:1`` (names); an argparse ``type=``."""
    if text.isdigit():
        return int(text)
    names = [d.strip() for d in text.split(",") if d.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"{text!r}: a device count or a comma-separated list of device names")
    return names
