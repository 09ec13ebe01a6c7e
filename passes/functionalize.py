"""Functionalize pass: rewrite in-place ops on activations into their out-of-place forms.

Why: the target graph taps each block's input x and pre-activation â. If a later op mutates one of them in
place (``h = fc(x); h.mul_(2)``, ``nn.Hardswish(inplace=True)``, ``out += identity``), the tapped value and the
gradient taken with respect to it no longer mean "the block's pre-activation", and the update is silently
wrong. After this pass no activation is mutated in place, so every tap is exact.

How: the graph is run once on the example inputs; an op *mutated* an argument when that tensor's version
counter moved while the op ran (this catches every spelling: ``x.relu_()``, ``F.relu(x, inplace=True)``,
modules with ``inplace=True``, ``torch.relu_``, ATen ``*_`` overloads). Each such op is replaced by its
out-of-place form and every later use of the mutated tensor (and of anything that was that same tensor
object) reads the new value instead. A mutation that a *different view* of the same storage would observe
later cannot be expressed that way and is refused, naming the node. In-place writes to buffers (running
statistics) are left alone; writes to the model's inputs or parameters are refused.

Pre-condition: ``gm`` runs on ``example_inputs``. Post-condition: the returned graph computes the same output
and mutates no activation, model input or parameter (checked by :func:`ensures_functional`).

Example:
    >>> import torch
    >>> class M(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__(); self.fc = torch.nn.Linear(3, 3)
    ...     def forward(self, x):
    ...         h = self.fc(x); h.mul_(2.0); return torch.tanh(h)
    >>> gm = functionalize_inplace(torch.fx.symbolic_trace(M()), (torch.randn(2, 3),))
    >>> [n.target for n in gm.graph.nodes if n.op == "call_method"]
    ['mul']
"""
from __future__ import annotations

import copy
import inspect
import operator
from typing import Any, Callable

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from lwcompile.errors import TraceError
from lwcompile.passes.state import preserved_state

_OPERATOR_INPLACE = {operator.iadd: operator.add, operator.isub: operator.sub, operator.imul: operator.mul,
                     operator.itruediv: operator.truediv, operator.ifloordiv: operator.floordiv,
                     operator.ipow: operator.pow, operator.imatmul: operator.matmul, operator.iand: operator.and_,
                     operator.ior: operator.or_, operator.ixor: operator.xor}



def zero_out_of_place(a: torch.Tensor) -> torch.Tensor:
    """``a.zero_()`` as a new tensor."""
    return torch.zeros_like(a)


def fill_out_of_place(a: torch.Tensor, value: Any) -> torch.Tensor:
    """``a.fill_(value)`` as a new tensor."""
    if isinstance(value, torch.Tensor):
        return value.to(a.dtype).expand_as(a).clone()
    return torch.full_like(a, value)


def copy_out_of_place(a: torch.Tensor, src: torch.Tensor, non_blocking: bool = False) -> torch.Tensor:
    """``a.copy_(src)`` as a new tensor."""
    return src.to(a.dtype).expand_as(a).clone()


# In-place methods with no same-named out-of-place twin.
_METHOD_REWRITES: dict[str, Callable[..., Any]] = {
    "zero_": zero_out_of_place, "fill_": fill_out_of_place, "copy_": copy_out_of_place,
}


class _Recorder(fx.Interpreter):
    """Runs the graph, noting each node's output tensors and which argument nodes it mutated."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        # Every output is kept alive until the analysis ends: a freed tensor's storage address could be reused
        # by a later one, and two unrelated activations would then look like views of each other.
        self.tensors: dict[fx.Node, list[torch.Tensor]] = {}
        self.mutated: dict[fx.Node, list[fx.Node]] = {}

    def run_node(self, n: fx.Node) -> Any:
        args, kwargs = self.fetch_args_kwargs_from_env(n)
        before = [(a, t, t._version) for a in n.all_input_nodes for t in _leaves(self.env.get(a))]
        out = super().run_node(n)
        self.tensors[n] = _leaves(out)
        moved = [a for a, t, v in before if t._version != v]
        if moved:
            self.mutated[n] = list(dict.fromkeys(moved))
        return out


def _leaves(v: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(v) if isinstance(t, torch.Tensor)]


def _storages(ts: list[torch.Tensor]) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in ts if t.numel() > 0}


def _is_parameter(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op != "get_attr":
        return False
    try:
        return isinstance(gm.get_parameter(node.target), nn.Parameter)
    except AttributeError:
        return False


def _inplace_flag_off(fn: Callable, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    """(args, kwargs) with ``inplace=False`` for a function that takes an ``inplace`` argument."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    if "inplace" not in sig.parameters:
        return None
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError:
        return None
    bound.arguments["inplace"] = False
    return tuple(bound.args), dict(bound.kwargs)


def _out_of_place(gm: fx.GraphModule, n: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    """(op, target, args, kwargs) of the out-of-place form of in-place node ``n``, or None if unknown."""
    if n.op == "call_module":
        mod = gm.get_submodule(n.target)
        if getattr(mod, "inplace", False) is True:
            twin = copy.copy(mod)  # activation modules hold no parameters: a shallow copy is independent enough
            twin.inplace = False
            name = "_lw_out_of_place_" + n.target.replace(".", "_")
            gm.add_submodule(name, twin)  # on the traced module itself, never on the user's modules
            return "call_module", name, n.args, dict(n.kwargs)
        return None
    if n.op == "call_method":
        name = n.target
        if name in _METHOD_REWRITES:
            return "call_function", _METHOD_REWRITES[name], n.args, dict(n.kwargs)
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name[:-1]):
            return "call_method", name[:-1], n.args, dict(n.kwargs)
        return None
    if n.op == "call_function":
        fn = n.target
        if fn in _OPERATOR_INPLACE:
            return "call_function", _OPERATOR_INPLACE[fn], n.args, dict(n.kwargs)
        if isinstance(fn, torch._ops.OpOverload):
            return _aten_out_of_place(n)
        flagged = _inplace_flag_off(fn, n.args, dict(n.kwargs))
        if flagged is not None:
            return "call_function", fn, flagged[0], flagged[1]
        name = getattr(fn, "__name__", "")
        if name.endswith("_") and not name.startswith("_"):
            for home in (torch, torch.nn.functional, torch.special):
                twin = getattr(home, name[:-1], None)
                if callable(twin) and getattr(home, name, None) is fn:
                    return "call_function", twin, n.args, dict(n.kwargs)
    return None


def _aten_out_of_place(n: fx.Node) -> tuple[str, Any, tuple, dict] | None:
    schema = n.target._schema
    base = schema.name.split("::")[-1]
    if not base.endswith("_"):
        return None
    packet = getattr(torch.ops.aten, base[:-1], None)
    overload = getattr(packet, schema.overload_name or "default", None) if packet is not None else None
    return None if overload is None else ("call_function", overload, n.args, dict(n.kwargs))


def _refuse(n: fx.Node, why: str) -> TraceError:
    return TraceError(f"node {n.name!r} ({n.format_node()}) {why}. lwcompile compiles in-place ops like their "
                      "out-of-place forms only when nothing else can observe the mutation; rewrite this line "
                      "out of place (e.g. `h = h * 2` instead of `h.mul_(2)`).")


def functionalize_inplace(gm: fx.GraphModule, example_inputs: tuple) -> fx.GraphModule:
    """Rewrite ``gm`` in place so that no op mutates an activation; returns ``gm``."""
    rec = _Recorder(gm)
    with torch.no_grad(), preserved_state(gm):
        rec.run(*pytree.tree_leaves(example_inputs))
    if not rec.mutated:
        return gm
    graph = gm.graph
    ident: dict[fx.Node, set[int]] = {k: {id(t) for t in v} for k, v in rec.tensors.items()}
    store: dict[fx.Node, set[int]] = {k: _storages(v) for k, v in rec.tensors.items()}
    for n in list(graph.nodes):
        if n not in rec.mutated:
            continue
        # buffers (running statistics) are not activations: their in-place update is part of the model
        targets = [a for a in rec.mutated[n] if not (a.op == "get_attr" and not _is_parameter(gm, a))]
        if not targets:
            continue
        if len(targets) != 1:
            raise _refuse(n, f"mutates several of its arguments ({', '.join(a.name for a in targets)}) in place")
        a = targets[0]
        if a.op == "placeholder" or a.op == "get_attr":
            raise _refuse(n, f"writes in place into {'the model input' if a.op == 'placeholder' else 'parameter'} "
                             f"{a.target!r}")
        form = _out_of_place(gm, n)
        if form is None:
            raise _refuse(n, "is an in-place op lwcompile has no out-of-place form for")
        obj, mem = ident[a], store[a]
        order = {node: i for i, node in enumerate(graph.nodes)}
        later = lambda u: order[u] > order[n]  # noqa: E731
        for m in graph.nodes:  # another view of the same memory, made before the write and read after it
            if order[m] >= order[n]:
                break  # views made later are made from the written value, which the rewrite hands them
            if not (store.get(m, set()) & mem) or (ident.get(m, set()) & obj):
                continue
            if any(later(u) for u in m.users):
                raise _refuse(n, f"writes in place into memory that node {m.name!r} (another view of it) reads later")
        with graph.inserting_after(n):
            new = graph.create_node(form[0], form[1], tuple(form[2]), form[3], name=n.name.rstrip("_") + "_functional")
        new.meta = dict(n.meta)
        for m in list(graph.nodes):
            if m is new or not (ident.get(m, set()) & obj):
                continue
            for u in list(m.users):
                if u is not new and later(u):
                    u.replace_input_with(m, new)
        graph.erase_node(n)  # every user of n came after it and now reads `new`
        ident[new], store[new] = obj, mem
    graph.lint()
    gm.recompile()
    return gm
