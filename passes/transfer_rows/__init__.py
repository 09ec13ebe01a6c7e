"""The built-in transfer rows, by family: ``paper`` (the paper's), ``clamp`` (hardtanh …), ``smooth`` (selu …).

A new built-in transfer function is one ``TransferRow`` appended to a family's ``ROWS`` (a new family: a module
here and one line below). :mod:`lwcompile.passes.transfer` serves the table and the lookups computed from it.

Example:
    >>> [r.name for r in BUILTIN_ROWS][:3]
    ['identity', 'relu', 'leaky_relu']
"""
from lwcompile.passes.transfer_rows import clamp, paper, smooth
from lwcompile.passes.transfer_rows.row import Kw, TransferRow, elementwise

BUILTIN_ROWS: tuple[TransferRow, ...] = paper.ROWS + clamp.ROWS + smooth.ROWS

__all__ = ["BUILTIN_ROWS", "Kw", "TransferRow", "elementwise"]
