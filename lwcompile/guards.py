"""Guards: what a compiled program assumed about the model when it traced it, checked before every step.

Tracing freezes Python state into the graphs: each module's train/eval flag, its plain attributes read in
``forward`` (``self.temp``, ``self.scale``), which tensor each parameter name refers to and whether it requires
grad. Like torch.compile's guards, :func:`snapshot` records these facts and :func:`differences` says which
changed, so the program re-traces instead of silently running stale graphs. Python values a loss function
*closes over* (not module attributes) cannot be seen and are not guarded (README: limits).

Example:
    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LeakyReLU(0.1))
    >>> g = snapshot(m, None)
    >>> m[1].negative_slope = 0.2
    >>> differences(g, snapshot(m, None))
    ["attribute '1.negative_slope' changed from 0.1 to 0.2"]
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

_PLAIN = (int, float, bool, str, type(None))


@dataclass(frozen=True, eq=False)
class Guards:
    """Facts about a model and its loss at trace time (compare with :func:`differences`, not ``==``)."""

    training: tuple[tuple[str, bool], ...]
    tensors: tuple[tuple[str, torch.Tensor, bool, tuple], ...]  # (name, tensor object, requires_grad, layout)
    attrs: tuple[tuple[str, str], ...]  # (qualified attribute, repr of its plain value)
    hooks: tuple[tuple[str, str, tuple], ...] = ()  # (module, hook dict, ((handle id, id(fn)), ...)); global: "*"


_HOOKS = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks")
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


def _hooks(prefix: str, root: nn.Module) -> list[tuple[str, str, tuple]]:
    # The trace runs forward hooks into the graphs (passes/trace_hooks.py): one added or removed later must
    # re-trace (or be refused there), never be skipped by graphs traced without it.
    out = []
    for mname, mod in root.named_modules(remove_duplicate=False):
        for kind in _HOOKS:
            d = getattr(mod, kind, None)
            if d:
                out.append((".".join(x for x in (prefix, mname) if x) or "(root)", kind,
                            tuple((k, id(f)) for k, f in d.items())))
    return out


def _global_hooks() -> list[tuple[str, str, tuple]]:
    from torch.nn.modules import module as _module
    return [("*", kind, tuple((k, id(f)) for k, f in getattr(_module, kind).items()))
            for kind in _GLOBAL_HOOKS if getattr(_module, kind, None)]


def _plain(v: Any) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(isinstance(x, _PLAIN) for x in v))


def _attrs(prefix: str, root: nn.Module) -> list[tuple[str, str]]:
    out = []
    for mname, mod in root.named_modules(remove_duplicate=False):
        for k, v in vars(mod).items():
            if k != "training" and _plain(v):
                out.append((".".join(x for x in (prefix, mname, k) if x), repr(v)))
    return out


def _layout(t: torch.Tensor) -> tuple:
    return tuple(t.shape), t.dtype, t.device


def snapshot(model: nn.Module, loss_fn: Any) -> Guards:
    """Record the guarded facts of ``model`` (and of ``loss_fn`` when it is an ``nn.Module``)."""
    training = tuple((n, m.training) for n, m in model.named_modules(remove_duplicate=False))
    tensors = tuple((n, t, t.requires_grad, _layout(t)) for n, t in model.named_parameters(remove_duplicate=False))
    tensors += tuple((n, t, False, _layout(t)) for n, t in model.named_buffers(remove_duplicate=False))
    attrs = _attrs("", model)
    hooks = _hooks("", model) + _global_hooks()
    if isinstance(loss_fn, nn.Module):
        hooks += _hooks("loss_fn", loss_fn)
        attrs += _attrs("loss_fn", loss_fn)
        training += tuple(("loss_fn." + n, m.training) for n, m in loss_fn.named_modules(remove_duplicate=False))
        # The target graph holds the loss's tensors (CrossEntropyLoss(weight=...)) by reference: in-place edits
        # are seen, a reassigned tensor is not, so guard their identity (layout () : a re-trace absorbs any).
        held = list(loss_fn.named_parameters(remove_duplicate=False)) + list(loss_fn.named_buffers(remove_duplicate=False))
        tensors += tuple(("loss_fn." + n, t, False, ()) for n, t in held)
    return Guards(training, tensors, tuple(attrs), tuple(hooks))


def differences(old: Guards, new: Guards) -> list[str]:
    """Human-readable list of what changed between two snapshots (empty: the graphs are still valid)."""
    out: list[str] = []
    if old.training != new.training:
        out.append("a module switched between train() and eval()")
    out += layout_changes(old, new)
    before = {n: (t, rg) for n, t, rg, _ in old.tensors}
    after = {n: (t, rg) for n, t, rg, _ in new.tensors}
    for n in sorted(set(before) | set(after)):
        if n not in before or n not in after:
            out.append(f"tensor {n!r} was {'added' if n in after else 'removed'}")
            continue
        (t0, rg0), (t1, rg1) = before[n], after[n]
        if t0 is not t1:
            out.append(f"{n!r} was replaced by another tensor")
        elif rg0 != rg1:
            out.append(f"{n!r}.requires_grad changed to {rg1}")
    h0, h1 = {(m, k): v for m, k, v in old.hooks}, {(m, k): v for m, k, v in new.hooks}
    for m, k in sorted(set(h0) | set(h1)):
        if h0.get((m, k)) != h1.get((m, k)):
            out.append(f"the {k.strip('_').replace('_', ' ')} of module {m!r} changed" if m != "*" else
                       f"global module {k.strip('_').replace('global_', '').replace('_', ' ')} changed")
    a0, a1 = dict(old.attrs), dict(new.attrs)
    for k in sorted(set(a0) | set(a1)):
        if a0.get(k) != a1.get(k):
            out.append(f"attribute {k!r} changed from {a0.get(k, '(unset)')} to {a1.get(k, '(unset)')}")
    return out


def layout_changes(old: Guards, new: Guards) -> list[str]:
    """Changes no re-trace can absorb: a tensor that changed shape, dtype or device (the optimizer state and
    compiled shapes no longer fit)."""
    before = {n: lay for n, _, _, lay in old.tensors}
    out = []
    for n, _, _, lay in new.tensors:
        o = before.get(n)
        if o is not None and o != lay:
            out.append(f"{n!r} is now {lay[0]} {lay[1]} on {lay[2]} (was {o[0]} {o[1]} on {o[2]})")
    return out
