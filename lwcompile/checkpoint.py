"""Checkpoints of a Program's training state, in PyTorch's ``state_dict`` convention.

:meth:`lwcompile.Program.state_dict` holds what training keeps beyond the model's own ``state_dict()`` (weights
and buffers): every block's inner-optimizer state, the outer optimizer's ``state_dict()``, ``step_count`` (which
is also the inner-lr schedule's position, :mod:`lwcompile.schedule`), the inner lr set with ``prog.inner_lr = ...``
and a fingerprint of what it fits (block names, ops, parameter shapes and dtypes, non-block parameters, the Config
fields that change the numbers). Only tensors and plain Python values: ``torch.load(path, weights_only=True)``
reads it. :func:`read_state` checks a state against a program and refuses, naming every difference, before
anything changes.

Example:
    >>> import io, torch, lwcompile
    >>> def make():
    ...     torch.manual_seed(0)
    ...     m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2))
    ...     return m, lwcompile.transform(m, torch.nn.functional.mse_loss, torch.zeros(8, 3), inner_optimizer="adam")
    >>> x, y = torch.randn(8, 3), torch.randn(8, 2)
    >>> model, prog = make()
    >>> _ = prog.step(x, y)
    >>> buf = io.BytesIO(); torch.save({"model": model.state_dict(), "program": prog.state_dict()}, buf)
    >>> _ = buf.seek(0); saved = torch.load(buf, weights_only=True)
    >>> model2, prog2 = make()
    >>> model2.load_state_dict(saved["model"]); prog2.load_state_dict(saved["program"])
    <All keys matched successfully>
    >>> prog.step(x, y) == prog2.step(x, y), prog2.step_count
    (True, 2)
"""
from __future__ import annotations

import copy
import dataclasses
import math
from typing import TYPE_CHECKING, Any, Mapping

import torch

from lwcompile.errors import LwcompileError

if TYPE_CHECKING:
    from lwcompile.outer import OuterOptimizer
    from lwcompile.program import Program

FORMAT = "lwcompile.Program.state_dict/1"
# Config fields that change no number a step computes: a checkpoint may be resumed with other values.
# compile_inner changes at most the float rounding of the same arithmetic (and falls back to eager where compiling
# fails), so a run compiled on one machine may resume eagerly on another; fuse likewise (a bmm for N mm's).
_FREE_FIELDS = ("check_finite", "frontend", "reuse_preactivation", "compile_inner", "fuse")


def fingerprint(prog: Program) -> dict[str, Any]:
    """What a program's training state fits, as plain values (compared by :func:`differences`)."""
    gm = prog.trace_result.graph_module

    def layout(name: str) -> list:
        t = gm.get_parameter(name)
        return [name, list(t.shape), str(t.dtype)]

    cfg = prog.config
    return {"blocks": {b.name: [b.op] + [layout(p) for p in b.params] for b in prog.blocks},
            "nonblock": [layout(n) for n in prog.nonblock],
            "config": {f.name: repr(getattr(cfg, f.name)) for f in dataclasses.fields(cfg) if f.name not in _FREE_FIELDS}}


def differences(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    """Human-readable list of how a checkpoint's fingerprint differs from a program's (empty: it fits)."""
    def part(key: str, kind: type) -> Any:
        v = saved.get(key) if isinstance(saved, Mapping) else None
        return v if isinstance(v, kind) else kind()

    out = []
    c0, c1 = part("config", dict), now["config"]
    out += [f"Config.{k} is {c0.get(k, '(absent)')} in the checkpoint but {c1.get(k, '(absent)')} here"
            for k in sorted(set(c0) | set(c1)) if c0.get(k) != c1.get(k)]
    b0, b1 = part("blocks", dict), now["blocks"]
    for name in list(b0) + [n for n in b1 if n not in b0]:
        if name not in b0 or name not in b1:
            out.append(f"block {name!r} is {'only in the checkpoint' if name in b0 else 'not in the checkpoint'}")
        elif b0[name] != b1[name]:
            out.append(f"block {name!r} is {_show(b0[name])} in the checkpoint but {_show(b1[name])} here")
    n0, n1 = part("nonblock", list), now["nonblock"]
    if n0 != n1:
        out.append(f"the non-block parameters are {_show(n0)} in the checkpoint but {_show(n1)} here")
    return out


def _show(entry: Any) -> str:
    return repr(entry).replace("'", "")


def program_state(prog: Program, outer: OuterOptimizer | None) -> dict[str, Any]:
    """A copy of ``prog``'s training state (later steps do not change it); ``outer`` is its outer optimizer."""
    return {"format": FORMAT, "fingerprint": fingerprint(prog), "step_count": int(prog.step_count),
            "inner_lr": float(prog.inner_lr),
            "inner_state": {name: [t.detach().clone() for t in s] for name, s in prog.inner_state.items()},
            "outer": copy.deepcopy(outer.state_dict()) if outer is not None else None}


def read_state(prog: Program, sd: Any, fresh_outer: OuterOptimizer | None
               ) -> tuple[dict[str, tuple[torch.Tensor, ...]], OuterOptimizer | None, int, float]:
    """Check ``sd`` against ``prog`` and return (inner state, outer optimizer, step count, inner lr) to install.

    ``fresh_outer`` is a new outer optimizer over ``prog``'s non-block parameters; it receives the saved state.
    Raises :class:`LwcompileError` naming what does not fit; nothing of ``prog`` is changed here.
    """
    if not isinstance(sd, Mapping) or sd.get("format") != FORMAT:
        got = sorted(map(str, sd))[:4] if isinstance(sd, Mapping) else type(sd).__name__
        raise LwcompileError(f"not an lwcompile Program state_dict (format {FORMAT!r}; got {got}): pass what "
                             "prog.state_dict() returned; a model's own state_dict() goes to model.load_state_dict.")
    diff = differences(sd.get("fingerprint", {}), fingerprint(prog))
    if diff:
        raise LwcompileError("this checkpoint was saved from a different program: " + "; ".join(diff) +
                             ". Load it into the model and Config it was saved from (lwcompile.transform them again).")
    count, lr = sd.get("step_count"), sd.get("inner_lr")
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise LwcompileError(f"checkpoint step_count={count!r}: must be an int >= 0.")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr < 0:
        raise LwcompileError(f"checkpoint inner_lr={lr!r}: must be a finite number >= 0.")
    return _inner_state(prog, sd.get("inner_state")), _outer(fresh_outer, sd.get("outer")), count, float(lr)


def _inner_state(prog: Program, saved: Any) -> dict[str, tuple[torch.Tensor, ...]]:
    now = prog.inner_state
    if not isinstance(saved, Mapping) or set(saved) != set(now):
        raise LwcompileError(f"checkpoint inner_state must map every block {sorted(now)} to its optimizer state.")
    out = {}
    for name, current in now.items():
        got = list(saved[name]) if isinstance(saved[name], (list, tuple)) else None
        if got is None or len(got) != len(current) or any(
                not isinstance(t, torch.Tensor) or t.shape != c.shape or t.dtype != c.dtype
                for t, c in zip(got, current)):
            raise LwcompileError(f"checkpoint inner_state[{name!r}] does not fit block {name!r}'s "
                                 f"{prog.config.inner_optimizer} state ({_layouts(current)}; got {_layouts(got)}).")
        out[name] = tuple(t.detach().to(c.device).clone() for t, c in zip(got, current))
    return out


def _layouts(ts: Any) -> str:
    if ts is None:
        return "not a list"
    return ", ".join(f"{list(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else type(t).__name__
                     for t in ts) or "nothing"


def _outer(fresh: OuterOptimizer | None, saved: Any) -> OuterOptimizer | None:
    if (fresh is None) != (saved is None):
        raise LwcompileError("checkpoint outer optimizer state " + ("is missing" if saved is None else "is present") +
                             " but this program " + ("has" if fresh is not None else "has no") + " outer optimizer.")
    if fresh is not None:
        _check_outer_slots(fresh, saved)
        try:  # the copy keeps the caller's dict untouched: torch optimizers alias and update loaded tensors in place
            fresh.load_state_dict(copy.deepcopy(dict(saved)))
        except (ValueError, KeyError, TypeError, RuntimeError) as e:
            raise LwcompileError(f"checkpoint outer optimizer state does not fit this program's "
                                 f"{type(fresh.optimizer).__name__}: {e}") from e
    return fresh


_SCALAR_SLOTS = ("step",)  # the one slot of sgd/momentum/adam/adamw/rmsprop that is not shaped like its parameter


def _check_outer_slots(fresh: OuterOptimizer, saved: Any) -> None:
    """Every saved tensor slot (``exp_avg``, ``momentum_buffer``, ...) must have its parameter's shape and dtype,
    as the inner state must: torch's ``load_state_dict`` takes any shape (each later step would then fail inside
    ``torch.optim``) and casts any dtype."""
    if not isinstance(saved, Mapping) or not isinstance(saved.get("state"), Mapping) \
            or not isinstance(saved.get("param_groups"), (list, tuple)):
        raise LwcompileError("checkpoint outer optimizer state is not a torch optimizer state_dict "
                             "({'state': ..., 'param_groups': [...]}).")
    ids = [i for g in saved["param_groups"] if isinstance(g, Mapping) for i in (g.get("params") or [])]
    params = [p for g in fresh.optimizer.param_groups for p in g["params"]]
    if len(ids) != len(params):
        raise LwcompileError(f"checkpoint outer optimizer state steps {len(ids)} parameters but this program's "
                             f"{type(fresh.optimizer).__name__} steps {len(params)} ({', '.join(fresh.names)}).")
    where = {i: k for k, i in enumerate(ids)}
    for i, slots in saved["state"].items():
        if i not in where or not isinstance(slots, Mapping):
            raise LwcompileError(f"checkpoint outer optimizer state has an entry {i!r} for no parameter.")
        k = where[i]
        p, name = params[k], fresh.names[k] if k < len(fresh.names) else str(k)
        for slot, t in slots.items():
            if slot in _SCALAR_SLOTS or t is None or not isinstance(t, torch.Tensor):
                continue
            if t.shape != p.shape or t.dtype != p.dtype:
                raise LwcompileError(
                    f"checkpoint outer optimizer state of parameter {name!r}, slot {slot!r}, is {list(t.shape)} "
                    f"{t.dtype}, but {name!r} is {list(p.shape)} {p.dtype}: the checkpoint does not fit this "
                    "program; load the one saved from it.")
