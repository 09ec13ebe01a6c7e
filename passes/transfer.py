"""The transfer-function table: one :class:`TransferRow` per f of METHOD.md, and the lookups computed from it.

The built-in rows live in :mod:`lwcompile.passes.transfer_rows` (by family); users add theirs with
:func:`lwcompile.register_transfer`, which calls :func:`add_transfer_row`. Everything else reads the table:
``TRANSFERS`` (name → row; ``vjp(z, v, kw)`` is f′(z)ᵀv, ``F(z, kw)`` an antiderivative of f used only to
*report* matching-loss values), and the spellings the partitioner matches, ``TRANSFER_MODULES`` (class → name),
``TRANSFER_FUNCTIONS`` (function or ATen overload → name), ``TRANSFER_METHODS`` (tensor method → name) and
``TRANSFER_OPTIONS`` (name → option names). These are read-only views, recomputed whenever a row is added or
removed; nothing writes them by hand.

Example:
    >>> import torch
    >>> t = TRANSFERS["tanh"]
    >>> z = torch.tensor([0.5])
    >>> bool(torch.allclose(t.vjp(z, torch.ones(1), {}), 1 - torch.tanh(z) ** 2))
    True
    >>> TRANSFER_FUNCTIONS[torch.ops.aten.relu6.default], TRANSFER_OPTIONS["celu"]
    ('relu6', ('alpha',))
"""
from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import torch

from lwcompile.errors import ConfigError
from lwcompile.passes.transfer_rows import BUILTIN_ROWS, Kw, TransferRow

Transfer = TransferRow  # the name the table's rows had before they carried their recognition and ONNX builders

_ROWS: dict[str, TransferRow] = {}
_BY: dict[str, dict[Any, str]] = {"module": {}, "function": {}, "method": {}}
_OPTIONS: dict[str, tuple[str, ...]] = {}

TRANSFERS: Mapping[str, TransferRow] = MappingProxyType(_ROWS)
TRANSFER_MODULES: Mapping[type, str] = MappingProxyType(_BY["module"])
TRANSFER_FUNCTIONS: Mapping[Any, str] = MappingProxyType(_BY["function"])
TRANSFER_METHODS: Mapping[str, str] = MappingProxyType(_BY["method"])
TRANSFER_OPTIONS: Mapping[str, tuple[str, ...]] = MappingProxyType(_OPTIONS)


def _claims(row: TransferRow) -> list[tuple[str, Any]]:
    """The row's spellings, refusing one that is unhashable or that another row already claims."""
    out = []
    for kind, key in row.spellings():
        try:
            owner = _BY[kind].get(key)
        except TypeError:  # unhashable
            raise ConfigError(f"transfer {row.name!r}: {key!r} is not hashable.") from None
        if owner is not None and owner != row.name:
            raise ConfigError(f"transfer {row.name!r}: {getattr(key, '__name__', key)!r} is already the transfer "
                              f"{owner!r}; one op maps to one transfer.")
        out.append((kind, key))
    return out


def _index(row: TransferRow) -> None:
    for kind, key in _claims(row):
        _BY[kind][key] = row.name
    _OPTIONS[row.name] = row.options
    _ROWS[row.name] = row


def _unindex(name: str) -> TransferRow:
    row = _ROWS.pop(name)
    _OPTIONS.pop(name, None)
    for kind, key in row.spellings():
        if _BY[kind].get(key) == name:
            del _BY[kind][key]
    return row


for _row in BUILTIN_ROWS:
    _index(_row)
BUILTIN_TRANSFERS: frozenset[str] = frozenset(_ROWS)


def add_transfer_row(row: TransferRow, replace: bool = False) -> None:
    """Add ``row`` to the table (``replace=True``: in place of a row of the same name that was added earlier).

    Built-in rows are never replaced. Raises :class:`lwcompile.errors.ConfigError` when the name is taken or
    when one of its spellings is another row's; the table is then unchanged.
    """
    if row.name in BUILTIN_TRANSFERS:
        raise ConfigError(f"register_transfer: {row.name!r} is a built-in transfer function and cannot be replaced; "
                          "register yours under another name.")
    if row.name in _ROWS and not replace:
        raise ConfigError(f"register_transfer: {row.name!r} is already registered; pass replace=True to replace it.")
    old = _unindex(row.name) if row.name in _ROWS else None
    try:
        _claims(row)
    except ConfigError:
        if old is not None:
            _index(old)
        raise
    _index(row)


def remove_transfer_row(name: str) -> TransferRow:
    """Remove a row added with :func:`add_transfer_row` (every spelling it claimed goes with it); returns it."""
    if name in BUILTIN_TRANSFERS:
        raise ConfigError(f"unregister_transfer: {name!r} is built in and cannot be removed.")
    if name not in _ROWS:
        added = sorted(set(_ROWS) - BUILTIN_TRANSFERS)
        raise ConfigError(f"unregister_transfer: no registered transfer {name!r}; registered: {added}.")
    return _unindex(name)


def transfer_for(kind: str, key: Any) -> TransferRow | None:
    """The row a graph spelling names: ``kind`` "module" (a class, exact type), "function" (a function or ATen
    overload) or "method" (a tensor method name); None when no row claims it."""
    try:
        name = _BY[kind].get(key)
    except TypeError:  # an unhashable call target
        return None
    return None if name is None else _ROWS[name]


def apply_transfer(z: torch.Tensor, name: str, kwargs: tuple = ()) -> torch.Tensor:
    """f(z), out of place: the tap pass puts this in place of a block's transfer node."""
    return _ROWS[name].f(z, dict(kwargs))


__all__ = ["BUILTIN_TRANSFERS", "Kw", "TRANSFERS", "TRANSFER_FUNCTIONS", "TRANSFER_METHODS", "TRANSFER_MODULES",
           "TRANSFER_OPTIONS", "Transfer", "TransferRow", "add_transfer_row", "apply_transfer", "remove_transfer_row",
           "transfer_for"]
