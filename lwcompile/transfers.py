"""Registering your own element-wise transfer function, without editing lwcompile.

``register_transfer(name, f, F, ...)`` builds one :class:`~lwcompile.passes.transfer_rows.row.TransferRow` (f, f′,
F, and the module classes, functions and tensor methods that compute it) and adds it to the transfer table with
:func:`lwcompile.passes.transfer.add_transfer_row`; the partitioner's lookups are computed from the rows. After that, a linear op followed by one of them is a block with ``transfer == name``: the
targets, the inner updates (they need f and f′ only) and the reported matching-loss values (F) use your functions.

What is registered is process-global, like the built-in tables: register before ``lwcompile.transform`` and keep
the row while a compiled Program that uses it lives. ONNX training artifacts cover only the built-in rows
(``squared_pre`` excepted, which needs no transfer); a block with a registered transfer is left out of them with
a note, and :func:`lwcompile.passes.onnx_training.export_training_artifacts` raises ExportError naming it.
"""
from __future__ import annotations

import inspect
import keyword
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.errors import ConfigError
from lwcompile.passes.transfer import (BUILTIN_TRANSFERS, TRANSFERS, TransferRow, add_transfer_row,
                                       remove_transfer_row)

# The names registered here, in registration order.
_ADDED: dict[str, None] = {}


def register_transfer(name: str, f: Callable[..., torch.Tensor], F: Callable[..., torch.Tensor],
                      fprime: Callable[..., torch.Tensor] | None = None, *, modules: Iterable[type] = (),
                      functions: Iterable[Callable] = (), methods: Iterable[str] = (),
                      options: Iterable[str] = (), replace: bool = False) -> None:
    """Teach lwcompile an element-wise transfer function f, its potential F (F′ = f) and optionally f′.

    ``f(z, **opts)``, ``F(z, **opts)`` and ``fprime(z, **opts)`` map a tensor to one of the same shape, element by
    element, with torch ops that ``make_fx`` can trace (no Python branching on values; use ``torch.where``).
    ``fprime`` defaults to autograd of f (``torch.func.vjp``). F only reports matching-loss values, so any
    antiderivative will do. ``options``: the option names f takes, read from a module's attributes of the same
    names, or from a call's positional arguments after the input (in this order) and its keywords.

    How the model must spell the op for the trace to keep it as one call the partitioner can match:
    ``functions``: a plain Python function wrapped with ``torch.fx.wrap`` where it is defined (symbolic tracing
    only), or a ``torch.library`` custom op (give the op object and its ``torch.ops.<ns>.<name>.default``
    overload; kept whole by both torch.fx and torch.export). ``modules``: nn.Module classes, matched by exact type,
    when the symbolic tracer keeps them as leaf modules (torch.export inlines every Python module).
    ``methods``: torch.Tensor method names. ``replace=True`` swaps a row registered earlier (never a built-in one).
    Raises :class:`lwcompile.errors.ConfigError` on bad input, naming what is wrong.

    Example (erf as the activation; F(z) = z·erf(z) + e^{−z²}/√π):
        >>> import math, torch, lwcompile
        >>> lwcompile.register_transfer("erf", torch.erf, functions=(torch.erf, torch.ops.aten.erf.default),
        ...                             F=lambda z: z * torch.erf(z) + torch.exp(-z * z) / math.sqrt(math.pi))
        >>> class Net(torch.nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.fc1, self.fc2 = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)
        ...     def forward(self, x):
        ...         return self.fc2(torch.erf(self.fc1(x)))
        >>> prog = lwcompile.transform(Net(), torch.nn.functional.mse_loss, torch.randn(8, 3))
        >>> [b.transfer for b in prog.blocks]
        ['erf', 'identity']
        >>> lwcompile.transfers.unregister_transfer("erf")
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise ConfigError(f"register_transfer: name must be a Python identifier such as 'swish2', got {name!r}.")
    if name in BUILTIN_TRANSFERS:
        raise ConfigError(f"register_transfer: {name!r} is a built-in transfer function and cannot be replaced; "
                          "register yours under another name.")
    if name in TRANSFERS and not replace:
        raise ConfigError(f"register_transfer: {name!r} is already registered; pass replace=True to replace it.")
    for what, fn in (("f", f), ("F", F), ("fprime", fprime)):
        if fn is not None and not callable(fn):
            raise ConfigError(f"register_transfer({name!r}): {what} must be callable, got {type(fn).__name__}.")
    if f is None or F is None:
        raise ConfigError(f"register_transfer({name!r}): f and F are required (F′ = f; it only reports loss values, "
                          "so an antiderivative up to a constant is enough).")
    opts = _names(name, "options", options)
    mods, fns, meths = _matchers(name, modules, functions, methods)
    row = _row(name, f, F, fprime, opts, mods, fns, meths)
    _check_row(name, row, f, opts)
    add_transfer_row(row, replace=replace)  # refuses a spelling another row claims, changing nothing
    _ADDED.pop(name, None)
    _ADDED[name] = None


def unregister_transfer(name: str) -> None:
    """Remove a transfer added by :func:`register_transfer` and its module/function/method entries."""
    remove_transfer_row(name)
    _ADDED.pop(name, None)


def registered_transfers() -> tuple[str, ...]:
    """Names added with :func:`register_transfer`, in registration order."""
    return tuple(_ADDED)


def _names(name: str, what: str, values: Iterable[str]) -> tuple[str, ...]:
    if isinstance(values, str):
        raise ConfigError(f"register_transfer({name!r}): {what} must be a tuple of names, got the string "
                          f"{values!r}; write ({values!r},).")
    out = tuple(values)
    bad = [v for v in out if not isinstance(v, str) or not v.isidentifier()]
    if bad or len(set(out)) != len(out):
        raise ConfigError(f"register_transfer({name!r}): {what} must be distinct identifiers, got {out!r}.")
    return out


def _matchers(name: str, modules: Iterable[type], functions: Iterable[Callable],
              methods: Iterable[str]) -> tuple[tuple[type, ...], tuple[Any, ...], tuple[str, ...]]:
    """Validate the spellings (whether another row claims one is :func:`add_transfer_row`'s to say)."""
    if isinstance(modules, type) or callable(functions) or isinstance(methods, str):
        raise ConfigError(f"register_transfer({name!r}): modules, functions and methods take tuples, "
                          "e.g. modules=(MyAct,).")
    mods, fns = tuple(modules), tuple(functions)
    meths = _names(name, "methods", methods)
    bad_mod = [m for m in mods if not (isinstance(m, type) and issubclass(m, nn.Module))]
    if bad_mod:
        raise ConfigError(f"register_transfer({name!r}): modules must be nn.Module subclasses, got {bad_mod!r}.")
    bad_fn = [fn for fn in fns if not callable(fn) or isinstance(fn, type)]
    if bad_fn:
        raise ConfigError(f"register_transfer({name!r}): functions must be functions (or ops), got {bad_fn!r}; "
                          "pass module classes as modules=.")
    if not (mods or fns or meths):
        raise ConfigError(f"register_transfer({name!r}): give at least one of modules=, functions=, methods= so "
                          "the partitioner can find it in a model.")
    return mods, fns, meths


def _row(name: str, f: Callable, F: Callable, fprime: Callable | None, opts: tuple[str, ...],
         mods: tuple[type, ...], fns: tuple[Any, ...], meths: tuple[str, ...]) -> TransferRow:
    def vjp(z: torch.Tensor, v: torch.Tensor, kw: dict) -> torch.Tensor:
        # torch.func ignores an outer no_grad and traces under make_fx, unlike a requires_grad copy of z.
        _, pull = torch.func.vjp(lambda t: f(t, **kw), z)
        return pull(v)[0]

    aten = tuple(fn for fn in fns if isinstance(fn, torch._ops.OpOverload))
    return TransferRow(name=name, f=lambda z, kw: f(z, **kw), F=lambda z, kw: F(z, **kw),
                       fprime=None if fprime is None else (lambda z, kw: fprime(z, **kw)),
                       jacobian_vjp=vjp if fprime is None else None, options=opts, modules=mods,
                       functions=tuple(fn for fn in fns if fn not in aten), aten=aten, methods=meths)


def _check_row(name: str, row: TransferRow, f: Callable, opts: tuple[str, ...]) -> None:
    """Run f, f′·v and F eagerly and under make_fx on a small tensor: a bad row fails here, not inside transform.

    Only when f can be called without its options (they have defaults): lwcompile cannot invent their values.
    """
    try:
        sig = inspect.signature(f)
    except ValueError:  # a builtin without a signature: the probe below decides
        sig = None
    if sig is not None:
        try:
            sig.bind(torch.zeros(1), **{o: None for o in opts})
        except TypeError as e:
            call = ", ".join(["z"] + [f"{o}=..." for o in opts])
            raise ConfigError(f"register_transfer({name!r}): f must accept f({call}) ({e}).") from None
        try:
            sig.bind(torch.zeros(1))
        except TypeError:
            return
    z = torch.linspace(-2.5, 2.5, 6).reshape(2, 3)
    checks = (("f", lambda t: row.f(t, {})), ("F", lambda t: row.F(t, {})),
              ("f'·v", lambda t: row.vjp(t, torch.ones_like(t), {})))
    for label, fn in checks:
        try:
            out = fn(z)
            make_fx(fn, tracing_mode="fake")(z)
        except Exception as e:  # noqa: BLE001 - any failure here is the user's function's
            raise ConfigError(f"register_transfer({name!r}): computing {label} on a (2, 3) tensor, eagerly and "
                              f"under make_fx, failed: {type(e).__name__}: {e}. Use torch ops only, with no "
                              "Python branching on tensor values.") from e
        if not isinstance(out, torch.Tensor) or out.shape != z.shape:
            got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
            raise ConfigError(f"register_transfer({name!r}): {label} must be element-wise (a (2, 3) tensor for a "
                              f"(2, 3) input), got {got}.")
