"""Exceptions a user can meet. Each names the module/node at fault and says what to do."""
from __future__ import annotations

from typing import Any, Sequence


class LwcompileError(Exception):
    """Base class of every error lwcompile raises on purpose."""


class ConfigError(LwcompileError, ValueError):
    """A bad configuration value (names the field, the value and the allowed ones)."""


class TraceError(LwcompileError):
    """Neither torch.fx symbolic tracing nor torch.export could capture the model."""


class PartitionError(LwcompileError):
    """The model has no block, or a parameter the partitioner cannot assign (e.g. tied weights)."""


class NonFiniteError(LwcompileError, FloatingPointError):
    """NaN or inf met in the loss, a target or a new weight; the model is left unchanged."""


class LossError(LwcompileError, ValueError):
    """The loss function returned something that is not a differentiable scalar."""


class ExportError(LwcompileError):
    """A graph could not be exported (names the graph and the op)."""


class DistributedError(LwcompileError, RuntimeError):
    """A rank failed, hung or lost its connection during distributed training; names the rank and the phase."""


class FileError(ConfigError):
    """A file or folder given to lwcompile cannot be used: ``"<path>: <problem>"``. The command line exits 2 on it, as
    on any other unusable argument."""

    exit_status = 2


def first_line(e: BaseException) -> str:
    """``"TypeName: first line of the message"``, for errors that quote an underlying one."""
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def describe_values(values: Sequence[Any]) -> str:
    """``"(8, 4) float32, (8,) int64"``: what a batch looked like, for messages about inputs and labels."""
    return ", ".join(f"{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}" if hasattr(v, "shape") and hasattr(v, "dtype")
                     else type(v).__name__ for v in values) or "none"
