"""Partition pass: find the (linear transform, transfer function) blocks of a traced model.

``partition(gm, example_inputs, skip)`` reads the op rows (linear ops: :mod:`lwcompile.passes.linear_ops`, transfer
functions: :mod:`lwcompile.passes.transfer`, through the lookups of :mod:`lwcompile.passes.registry`) and returns a
frozen :class:`Partition`: the blocks in graph order, the trainable parameters outside blocks, the block
DAG's edges (for placement) and the warnings it raised. The graph is not modified.

Example:
    >>> import torch
    >>> from lwcompile.passes.trace import trace
    >>> m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    >>> x = torch.randn(5, 3)
    >>> p = partition(trace(m, (x,)).graph_module, (x,))
    >>> [(b.name, b.op, b.transfer) for b in p.blocks]
    [('0', 'linear', 'relu'), ('2', 'linear', 'identity')]
"""
from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.utils import _pytree as pytree

from lwcompile.errors import PartitionError
from lwcompile.ir import Block, numel
from lwcompile.passes import registry as R
from lwcompile.passes.matmul_warnings import matmul_fed_warnings
from lwcompile.passes.grad_reach import reach
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.state import preserved_state
from lwcompile.passes.transfer import TransferRow, transfer_for


@dataclass(frozen=True)
class Partition:
    blocks: tuple[Block, ...]
    nonblock: tuple[str, ...]
    edges: tuple[tuple[str, str, int], ...]
    warnings: tuple[str, ...]


@dataclass(frozen=True)
class _LinearMatch:
    op: str
    x: fx.Node
    weight: str
    bias: str | None
    attrs: tuple
    consumer: fx.Node  # the node that uses the weight's get_attr (the op itself, or a transpose)


def _param_target(gm: fx.GraphModule, node: Any) -> str | None:
    if isinstance(node, fx.Node) and node.op == "get_attr":
        try:
            t = gm.get_parameter(node.target)
        except AttributeError:
            return None
        return node.target if isinstance(t, nn.Parameter) else None
    return None


def _arg(node: fx.Node, i: int, name: str) -> Any:
    """Argument ``i`` of a call, given positionally or by keyword (``F.linear(input=x, weight=w)``)."""
    return node.args[i] if len(node.args) > i else node.kwargs.get(name)


def _match_linear(gm: fx.GraphModule, node: fx.Node) -> _LinearMatch | None | str:
    """A _LinearMatch, None (not a linear op), or a string saying why a linear op cannot be a block."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        row = R.linear_for_module(mod)
        if row is None:
            return None
        plist = getattr(getattr(mod, "parametrizations", None), "weight", ())
        if mod.training and any(type(q).__name__ == "_SpectralNorm" for q in plist):
            raise PartitionError(
                f"module {node.target!r} uses spectral_norm in training mode: its power iteration updates the _u/_v "
                "buffers in place at every call, which lwcompile's passes cannot reproduce exactly. Call .eval() on "
                "it, or remove it with torch.nn.utils.parametrize.remove_parametrizations.")
        if not isinstance(getattr(mod, "weight", None), nn.Parameter):
            # torch.nn.utils.parametrize / weight_norm: the weight is computed from other parameters at each call,
            # so there is no weight tensor a local loss could step; those parameters take the backward's gradient
            return ("reads a computed weight (a parametrization such as weight_norm or orthogonal), not a "
                    "parameter; remove it with torch.nn.utils.parametrize.remove_parametrizations to make it a block")
        if getattr(mod, "bias", None) is not None and not isinstance(mod.bias, nn.Parameter):
            # a parametrized bias (or a bias buffer) is computed / not trainable by the block's local loss either
            return ("reads a computed bias (a parametrization, or a buffer), not a parameter; remove the "
                    "parametrization with torch.nn.utils.parametrize.remove_parametrizations to make it a block")
        bias = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
        if row.attr_args and (len(node.args) > 1 or node.kwargs.get("output_size") is not None):
            return "called with output_size"
        attrs = row.module_attrs(mod)
        if attrs is None:
            return "uses asymmetric 'same' padding"
        return _LinearMatch(row.name, node.args[0], f"{node.target}.weight", bias, attrs, node)
    row = R.linear_for_call(node.op, node.target)
    if row is None:
        return None
    if row.call == "weight":
        w = _param_target(gm, _arg(node, 1, "weight"))
        if w is None:
            return None
        b_node = _arg(node, 2, "bias")
        b = _param_target(gm, b_node)
        if b_node is not None and b is None:
            return "has a bias that is not a parameter"
        attrs = row.call_attrs(tuple(gm.get_parameter(w).shape), list(node.args[3:]),
                               {k: v for k, v in node.kwargs.items() if k not in ("input", "weight", "bias")})
        if attrs is None:
            return "uses asymmetric 'same' padding"
        return _LinearMatch(row.name, _arg(node, 0, "input"), w, b, attrs, node)
    if row.call == "addmm":
        return _match_addmm(gm, node, row)
    if len(node.args) == 2 or set(node.kwargs) in ({"other"}, {"input", "other"}):  # x @ W
        x, w = _arg(node, 0, "input"), _arg(node, 1, "other")
        direct = _param_target(gm, w)
        if direct is not None and gm.get_parameter(direct).dim() == 2:
            return _LinearMatch(row.name, x, direct, None, (), node)
        if row.transposed and isinstance(w, fx.Node) and R.is_transpose_of_2d(w):
            src = _param_target(gm, w.args[0])
            if src is not None and gm.get_parameter(src).dim() == 2:
                return _LinearMatch(row.transposed, x, src, None, (), w)
        if _param_target(gm, x) is not None:
            return "multiplies its weight from the left (W @ x)"
    return None


def _match_addmm(gm: fx.GraphModule, node: fx.Node, row) -> _LinearMatch | None | str:
    """``addmm(bias, x, W)`` / ``baddbmm(bias, x, W)`` (function, tensor method ``bias.addmm(x, W)`` or ATen)."""
    second, third = ("batch1", "batch2") if row.name == "baddbmm" else ("mat1", "mat2")
    b_node = node.args[0] if node.args else node.kwargs.get("input", node.kwargs.get("self"))
    x, w = _arg(node, 1, second), _arg(node, 2, third)
    kw = {k: v for k, v in node.kwargs.items() if k in ("alpha", "beta")}
    if any(not isinstance(v, (int, float)) for v in kw.values()):
        return "has a non-constant alpha or beta" if _param_target(gm, w) else None
    direct = _param_target(gm, w)
    want = 3 if row.name == "baddbmm" else 2
    if direct is None or gm.get_parameter(direct).dim() != want:
        if direct is None and row.name == "addmm" and isinstance(w, fx.Node) and R.is_transpose_of_2d(w):
            src = _param_target(gm, w.args[0])  # addmm(b, x, W.t()): F.linear(x, W, b) when α = β = 1
            if src is not None and gm.get_parameter(src).dim() == 2:
                b = _param_target(gm, b_node)
                n_out = gm.get_parameter(src).shape[0]
                if b is None or kw.get("alpha", 1) != 1 or kw.get("beta", 1) != 1 or \
                        tuple(gm.get_parameter(b).shape) != (n_out,):
                    return "multiplies a transposed weight with a bias, alpha or beta that F.linear cannot take"
                return _LinearMatch("linear", x, src, b, (), w)
        if _param_target(gm, x) is not None:
            return "multiplies its weight from the left (W @ x)"
        return None
    b = _param_target(gm, b_node)
    if b is None:
        return "has a bias that is not a parameter"
    attrs = row.call_attrs(tuple(gm.get_parameter(direct).shape), [tuple(gm.get_parameter(b).shape)], kw)
    return _LinearMatch(row.name, x, direct, b, attrs, node)


def _transfer_options(row: TransferRow, args: tuple, kwargs: dict, source: Any = None) -> dict:
    keys = row.options
    if source is not None:  # a module: options are its attributes
        return {k: getattr(source, k) for k in keys if hasattr(source, k)}
    opts = dict(zip(keys, args))
    opts.update({k: v for k, v in kwargs.items() if k in keys})
    return opts


def _match_transfer(gm: fx.GraphModule, node: fx.Node) -> tuple[TransferRow, dict] | None | str:
    """(row, options) for a known transfer function, a string for an unknown element-wise op, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        row = transfer_for("module", type(mod))
        if row is not None:
            return row, _transfer_options(row, (), {}, mod)
        if isinstance(mod, R.UNKNOWN_ELEMENTWISE_MODULES):
            return type(mod).__name__
        return None
    kind = {"call_function": "function", "call_method": "method"}.get(node.op)
    row = transfer_for(kind, node.target) if kind else None
    if row is not None:
        return row, _transfer_options(row, tuple(node.args[1:]), dict(node.kwargs))
    target_name = getattr(node.target, "__name__", str(node.target)).split(".")[0]
    if node.op in ("call_function", "call_method") and target_name.rstrip("_") in R.UNKNOWN_ELEMENTWISE_NAMES:
        return target_name
    return None


def _shape(node: fx.Node) -> tuple[int, ...]:
    meta = node.meta.get("tensor_meta")
    if meta is None:
        raise PartitionError(f"no shape recorded for node {node.name!r}")
    return tuple(int(s) for s in meta.shape)


def _uses(gm: fx.GraphModule) -> dict[int, list[fx.Node]]:
    """Every graph node that consumes each parameter *tensor* (keyed by identity, so a weight tied by attribute
    assignment, ``self.out.weight = self.emb.weight``, is one entry whatever name each use reaches it by)."""
    uses: dict[int, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and _param_target(gm, node):
            uses.setdefault(id(gm.get_parameter(node.target)), []).extend(node.users)
        elif node.op == "call_module":
            for _, p in gm.get_submodule(node.target).named_parameters(remove_duplicate=False):
                uses.setdefault(id(p), []).append(node)
    return uses


def _own_uses(m: _LinearMatch, node: fx.Node) -> set[fx.Node]:
    """The nodes through which a block reads its own weight: the op, and a transpose only it consumes."""
    own = {node}
    if m.consumer is not node and set(m.consumer.users) == {node}:
        own.add(m.consumer)
    return own


def _block_name(m: _LinearMatch, node: fx.Node, taken: set[str]) -> str:
    if node.op == "call_module":
        name = node.target
    else:
        name = re.sub(r"[._]weight$", "", m.weight) or m.weight
    if name in taken:
        name = f"{name}#{node.name}"
    return name


def _skipped(patterns: tuple[str, ...], name: str, cls: str) -> bool:
    return any(re.search(p, name) or re.search(p, cls) for p in patterns)


def partition(gm: fx.GraphModule, example_inputs: tuple, skip: tuple[str, ...] = ()) -> Partition:
    """Find the blocks of ``gm`` (shapes from one run on ``example_inputs``, buffers restored after)."""
    with torch.no_grad(), preserved_state(gm):
        ShapeProp(gm).propagate(*pytree.tree_leaves(example_inputs))
    uses = _uses(gm)
    notes: list[str] = []
    dead = _no_gradient(gm, example_inputs, notes)
    blocks: list[Block] = []
    taken: set[str] = set()
    claimed: dict[int, str] = {}  # parameter tensor -> the block that trains it with its local loss
    shared: set[int] = set()  # block parameters that are also read outside their block
    noted: set[str] = set()  # linear-op nodes a note already explains
    for node in gm.graph.nodes:
        m = _match_linear(gm, node)
        if m is None:
            continue
        where = f"node {node.name!r} ({node.format_node()})"
        if isinstance(m, str):
            notes.append(f"{where} is linear in a weight but {m}; its parameters are trained by the outer optimizer.")
            noted.add(node.name)
            continue
        name = _block_name(m, node, taken)
        owner = m.weight.rpartition(".")[0]
        cls = type(gm.get_submodule(owner)).__name__ if owner else type(gm).__name__
        weight = gm.get_parameter(m.weight)
        if _skipped(skip, name, cls) or not weight.requires_grad:
            noted.add(node.name)  # asked for (skip) or frozen: no warning that it is not a block
            continue
        if node.name in dead.dead_nodes:  # eager autograd gives it no gradient: no target, no local loss
            notes.append(f"block candidate {name!r} ({where}) gets no gradient from the model output (computed "
                         "under torch.no_grad() or only used detached): it is not a block; its parameters move "
                         "only if another use gives them a gradient, as in eager PyTorch.")
            continue
        bias_t = gm.get_parameter(m.bias) if m.bias else None
        again = [claimed[id(t)] for t in (weight, bias_t) if t is not None and id(t) in claimed]
        if again:
            noted.add(node.name)
            notes.append(f"{where} reuses a parameter of block {again[0]!r} (tied weights): that block trains it "
                         "with its local loss; this use adds its gradient through the outer optimizer.")
            continue
        if not isinstance(m.x, fx.Node):
            raise PartitionError(f"block node {node.name!r}: its input is not a graph value")
        own = _own_uses(m, node)
        for t in (weight, bias_t):
            if t is not None and any(u not in own for u in uses.get(id(t), [])):
                shared.add(id(t))
        x_shape, z_shape = _shape(m.x), _shape(node)
        transfer, kw, t_node = "identity", {}, None
        users = list(node.users)
        if len(users) == 1:
            t = _match_transfer(gm, users[0])
            if isinstance(t, str):
                msg = f"block {name!r}: the op after it, node {users[0].name!r} ({t}), is not a transfer function lwcompile knows; the block is treated as identity."
                warnings.warn(msg, stacklevel=2)
                notes.append(msg)
            elif t is not None:
                row, opts = t
                kept = row.accept(users[0].target, tuple(users[0].args[1:]), opts, z_shape) if row.accept else opts
                if isinstance(kept, str):
                    msg = f"block {name!r}: {row.name} at node {users[0].name!r} {kept}; the block is treated as identity."
                    warnings.warn(msg, stacklevel=2)
                    notes.append(msg)
                elif row.name != "identity":
                    transfer, kw, t_node = row.name, kept, users[0].name
        w_shape = tuple(weight.shape)
        macs = LINEAR_OPS[m.op].macs(x_shape, z_shape, w_shape, dict(m.attrs))
        frozen = (m.bias,) if bias_t is not None and (not bias_t.requires_grad or m.bias in dead.dead_params) else ()
        blocks.append(Block(
            name=name, node=node.name, op=m.op, attrs=m.attrs, transfer=transfer,
            transfer_kwargs=tuple(sorted(kw.items())), weight=m.weight, bias=m.bias, weight_shape=w_shape,
            bias_shape=tuple(bias_t.shape) if bias_t is not None else None,
            input_shape=x_shape, output_shape=z_shape, flops_per_example=2 * macs, transfer_node=t_node,
            dtype_bytes=weight.element_size(), input_node=m.x.name, frozen=frozen))
        taken.add(name)
        for t in (weight, bias_t):
            if t is not None:
                claimed[id(t)] = name
    if not blocks:
        raise PartitionError(
            f"{type(gm).__name__} has no block: no parameter-carrying linear op (nn.Linear, nn.ConvNd, F.linear, "
            "x @ W.T, ...) was found" + (" outside the skip patterns" if skip else "") +
            (" that gets a gradient (some are used only under torch.no_grad() or detached)" if dead.dead_nodes
             and dead.dead_params else "") +
            ". lwcompile needs at least one; train this model with an ordinary optimizer.")
    # One entry per trainable tensor (its first name): every tensor outside blocks, and block tensors that are
    # also read elsewhere (tied weights), which the outer optimizer steps on the gradient of those other uses.
    unreached = {id(gm.get_parameter(n)) for n in dead.dead_params}
    nonblock = tuple(n for n, p in gm.named_parameters()
                     if p.requires_grad and id(p) not in unreached and (id(p) not in claimed or id(p) in shared))
    notes.extend(matmul_fed_warnings(gm, nonblock, claimed, noted, _uses(gm)))
    return Partition(tuple(blocks), nonblock, _block_edges(gm, blocks), tuple(notes))


def _no_gradient(gm: fx.GraphModule, example_inputs: tuple, notes: list[str]):
    """What the output's gradient never reaches (:mod:`lwcompile.passes.grad_reach`). Such parameters are in no
    block and not stepped by the outer optimizer: eager ``torch.optim`` skips a parameter whose grad is None."""
    dead = reach(gm, example_inputs)
    if dead.dead_params:
        notes.append(f"parameters {', '.join(repr(n) for n in dead.dead_params)} get no gradient from the model "
                     "output (used only under torch.no_grad(), after .detach(), or not at all): they are not "
                     "trained, as in eager PyTorch.")
    return dead


def _block_edges(gm: fx.GraphModule, blocks: list[Block]) -> tuple[tuple[str, str, int], ...]:
    """Producer → consumer edges between blocks, through any weightless glue, with the consumer's input bytes."""
    owner = {}
    for b in blocks:
        owner[b.node] = b.name
        if b.transfer_node:
            owner[b.transfer_node] = b.name
    nodes = {n.name: n for n in gm.graph.nodes}
    edges = []
    for b in blocks:
        node = nodes[b.node]
        bytes_in = b.activation_bytes - (numel(b.output_shape) * b.dtype_bytes)
        seen, stack, producers = set(), [a for a in node.all_input_nodes], set()
        while stack:
            n = stack.pop()
            if n.name in seen:
                continue
            seen.add(n.name)
            if n.name in owner and owner[n.name] != b.name:
                producers.add(owner[n.name])
                continue
            stack.extend(n.all_input_nodes)
        edges.extend((p, b.name, bytes_in) for p in sorted(producers))
    return tuple(edges)

