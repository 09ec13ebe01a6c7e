"""``TransferRow``: everything lwcompile knows about one transfer function f, in one frozen record.

A row holds the math (f, f′ or a Jacobian-vector product, the potential F with F′ = f), how a traced graph spells
the op (module classes, Python functions, ATen overloads, tensor-method names, the option names read from
module attributes or call arguments) and its ONNX node builders for onnxruntime-training artifacts (None where
ONNX has no exact form, e.g. Mish's F). The lookup tables the partitioner reads are computed from the rows
(:mod:`lwcompile.passes.transfer`), never written by hand.

Example:
    >>> import torch
    >>> row = elementwise("square_plus", lambda z, kw: z + z * z, lambda z, kw: 1 + 2 * z,
    ...                   lambda z, kw: z * z / 2 + z ** 3 / 3)
    >>> row.vjp(torch.tensor([1.0]), torch.tensor([2.0]), {})
    tensor([6.])
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import torch

if TYPE_CHECKING:  # ONNX builders only call its methods: onnx is not imported to define a row
    from lwcompile.passes.onnx_nodes import OnnxBuilder


Kw = dict[str, Any]
# (call target, positional args after the input, the options read, z's shape) -> the options to keep, or why the
# call is not this transfer (the block is then identity, with a warning that says so)
Accept = Callable[[Any, tuple, Kw, tuple], "Kw | str"]


@dataclass(frozen=True)
class TransferRow:
    """One transfer function. ``f(z, kw)``, ``F(z, kw)`` (F′ = f; reports loss values only) and either
    ``fprime(z, kw)`` (element-wise f′, so vjp is f′(z) ⊙ v) or ``jacobian_vjp(z, v, kw)`` = f′(z)ᵀv."""

    name: str
    f: Callable[[torch.Tensor, Kw], torch.Tensor]
    F: Callable[[torch.Tensor, Kw], torch.Tensor]
    fprime: Callable[[torch.Tensor, Kw], torch.Tensor] | None = None
    jacobian_vjp: Callable[[torch.Tensor, torch.Tensor, Kw], torch.Tensor] | None = None
    options: tuple[str, ...] = ()  # in positional order after the input
    modules: tuple[type, ...] = ()  # matched by exact type
    functions: tuple[Any, ...] = ()  # Python-level spellings (symbolic tracing), torch.library ops
    aten: tuple[Any, ...] = ()  # ATen overloads (torch.export); in-place ones are made out of place before
    methods: tuple[str, ...] = ()  # torch.Tensor method names
    onnx_f: "OnnxBuilder | None" = None
    onnx_F: "OnnxBuilder | None" = None
    accept: Accept | None = None

    def __post_init__(self) -> None:
        if (self.fprime is None) == (self.jacobian_vjp is None):
            raise ValueError(f"transfer row {self.name!r}: give exactly one of fprime and jacobian_vjp")

    def vjp(self, z: torch.Tensor, v: torch.Tensor, kw: Kw) -> torch.Tensor:
        """f′(z)ᵀv."""
        if self.fprime is not None:
            return self.fprime(z, kw) * v
        return self.jacobian_vjp(z, v, kw)

    def spellings(self) -> tuple[tuple[str, Any], ...]:
        """(kind, key) for every way a graph spells this op: kind is "module", "function" or "method"."""
        return (tuple(("module", m) for m in self.modules) + tuple(("function", fn) for fn in self.functions + self.aten)
                + tuple(("method", m) for m in self.methods))


def elementwise(name: str, f: Callable, fprime: Callable, F: Callable, **rest: Any) -> TransferRow:
    """A row for an element-wise f (its vjp is f′(z) ⊙ v)."""
    return TransferRow(name=name, f=f, F=F, fprime=fprime, **rest)
