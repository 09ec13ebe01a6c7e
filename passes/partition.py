"""Partition pass: find the (linear transform, transfer function) blocks of a traced model.

``partition(gm, example_inputs, skip)`` reads the tables of :mod:`lwcompile.passes.registry` and returns a
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
from lwcompile.passes.linear_ops import LINEAR_OPS
from lwcompile.passes.state import preserved_state


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


def _tuple(v, nd: int) -> tuple:
    if isinstance(v, (list, tuple)):
        return tuple(int(a) for a in v) if len(v) == nd else tuple(int(v[0]) for _ in range(nd))
    return (int(v),) * nd


def _same_padding(pad: Any, dil: tuple, k: tuple, nd: int) -> tuple | None:
    if pad == "valid":
        return (0,) * nd
    if pad == "same":
        if any((d * (kk - 1)) % 2 for d, kk in zip(dil, k)):
            return None  # asymmetric: torch pads one side more; not a plain conv
        return tuple(d * (kk - 1) // 2 for d, kk in zip(dil, k))
    return _tuple(pad, nd)


def _conv_attrs(op: str, w_shape: tuple, args: list, kwargs: dict) -> tuple | None:
    nd = int(op[-2])
    names = (["stride", "padding", "output_padding", "groups", "dilation"] if op.startswith("conv_transpose")
             else ["stride", "padding", "dilation", "groups"])
    vals = dict(zip(names, args))
    vals.update({k: v for k, v in kwargs.items() if k in names})
    dil = _tuple(vals.get("dilation", 1), nd)
    attrs = {"stride": _tuple(vals.get("stride", 1), nd), "dilation": dil, "groups": int(vals.get("groups", 1))}
    pad = _same_padding(vals.get("padding", 0), dil, tuple(w_shape[2:]), nd)
    if pad is None:
        return None
    attrs["padding"] = pad
    if op.startswith("conv_transpose"):
        attrs["output_padding"] = _tuple(vals.get("output_padding", 0), nd)
    return tuple(sorted(attrs.items()))


def _match_linear(gm: fx.GraphModule, node: fx.Node) -> _LinearMatch | None | str:
    """A _LinearMatch, None (not a linear op), or a string saying why a linear op cannot be a block."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        op = R.LINEAR_MODULES.get(type(mod)) or next(
            (v for k, v in R.LINEAR_MODULES.items() if isinstance(mod, k)), None)
        if op is None:
            return None
        bias = f"{node.target}.bias" if getattr(mod, "bias", None) is not None else None
        if op == "linear":
            return _LinearMatch(op, node.args[0], f"{node.target}.weight", bias, (), node)
        if len(node.args) > 1 or node.kwargs.get("output_size") is not None:
            return "called with output_size"
        w = tuple(mod.weight.shape)
        if op.startswith("conv_transpose"):
            attrs = _conv_attrs(op, w, [mod.stride, mod.padding, mod.output_padding, mod.groups, mod.dilation], {})
        else:
            attrs = _conv_attrs(op, w, [mod.stride, mod.padding, mod.dilation, mod.groups], {})
            if attrs is not None and mod.padding_mode != "zeros":
                attrs = tuple(sorted(dict(attrs, padding_mode=mod.padding_mode,
                                          reversed_padding=tuple(mod._reversed_padding_repeated_twice)).items()))
        if attrs is None:
            return "uses asymmetric 'same' padding"
        return _LinearMatch(op, node.args[0], f"{node.target}.weight", bias, attrs, node)
    if node.op == "call_function" and node.target in R.LINEAR_FUNCTIONS:
        op = R.LINEAR_FUNCTIONS[node.target]
        w = _param_target(gm, _arg(node, 1, "weight"))
        if w is None:
            return None
        b_node = _arg(node, 2, "bias")
        b = _param_target(gm, b_node)
        if b_node is not None and b is None:
            return "has a bias that is not a parameter"
        attrs: tuple | None = ()
        if op != "linear":
            attrs = _conv_attrs(op, tuple(gm.get_parameter(w).shape), list(node.args[3:]),
                                {k: v for k, v in node.kwargs.items() if k not in ("input", "weight", "bias")})
            if attrs is None:
                return "uses asymmetric 'same' padding"
        return _LinearMatch(op, _arg(node, 0, "input"), w, b, attrs, node)
    is_mm = (node.op == "call_function" and node.target in R.MATMUL_FUNCTIONS) or (
        node.op == "call_method" and node.target in R.MATMUL_METHODS)
    if is_mm and (len(node.args) == 2 or set(node.kwargs) in ({"other"}, {"input", "other"})):
        x, w = _arg(node, 0, "input"), _arg(node, 1, "other")
        direct = _param_target(gm, w)
        if direct is not None and gm.get_parameter(direct).dim() == 2:
            return _LinearMatch("matmul", x, direct, None, (), node)
        if isinstance(w, fx.Node) and R.is_transpose_of_2d(w):
            src = _param_target(gm, w.args[0])
            if src is not None and gm.get_parameter(src).dim() == 2:
                return _LinearMatch("linear", x, src, None, (), w)
        if _param_target(gm, x) is not None:
            return "multiplies its weight from the left (W @ x)"
    return None


def _transfer_options(name: str, args: tuple, kwargs: dict, source: Any = None) -> dict:
    keys = R.TRANSFER_OPTIONS[name]
    if source is not None:  # a module: options are its attributes
        return {k: getattr(source, k) for k in keys if hasattr(source, k)}
    opts = dict(zip(keys, args))
    opts.update({k: v for k, v in kwargs.items() if k in keys})
    return opts


def _match_transfer(gm: fx.GraphModule, node: fx.Node) -> tuple[str, dict] | None | str:
    """(name, options) for a known transfer function, a string for an unknown element-wise op, else None."""
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        name = R.TRANSFER_MODULES.get(type(mod))
        if name is not None:
            return name, _transfer_options(name, (), {}, mod)
        if isinstance(mod, R.UNKNOWN_ELEMENTWISE_MODULES):
            return type(mod).__name__
        return None
    if node.op == "call_function" and node.target in R.TRANSFER_FUNCTIONS:
        name = R.TRANSFER_FUNCTIONS[node.target]
        opts = _transfer_options(name, tuple(node.args[1:]), dict(node.kwargs))
        if node.target is torch.ops.aten.elu.default and tuple(node.args[2:4]) not in ((), (1,), (1, 1), (1.0, 1.0)):
            return "elu with scale"
        return name, opts
    if node.op == "call_method" and node.target in R.TRANSFER_METHODS:
        name = R.TRANSFER_METHODS[node.target]
        return name, _transfer_options(name, tuple(node.args[1:]), dict(node.kwargs))
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


def _softmax_on_last_axis(opts: dict, z_shape: tuple) -> bool:
    dim = opts.get("dim")
    return dim is not None and (dim == -1 or dim == len(z_shape) - 1)


def partition(gm: fx.GraphModule, example_inputs: tuple, skip: tuple[str, ...] = ()) -> Partition:
    """Find the blocks of ``gm`` (shapes from one run on ``example_inputs``, buffers restored after)."""
    with torch.no_grad(), preserved_state(gm):
        ShapeProp(gm).propagate(*pytree.tree_leaves(example_inputs))
    uses = _uses(gm)
    notes: list[str] = []
    blocks: list[Block] = []
    taken: set[str] = set()
    claimed: dict[int, str] = {}  # parameter tensor -> the block that trains it with its local loss
    shared: set[int] = set()  # block parameters that are also read outside their block
    for node in gm.graph.nodes:
        m = _match_linear(gm, node)
        if m is None:
            continue
        where = f"node {node.name!r} ({node.format_node()})"
        if isinstance(m, str):
            notes.append(f"{where} is linear in a weight but {m}; its parameters are trained by the outer optimizer.")
            continue
        name = _block_name(m, node, taken)
        owner = m.weight.rpartition(".")[0]
        cls = type(gm.get_submodule(owner)).__name__ if owner else type(gm).__name__
        weight = gm.get_parameter(m.weight)
        if _skipped(skip, name, cls) or not weight.requires_grad:
            continue
        bias_t = gm.get_parameter(m.bias) if m.bias else None
        again = [claimed[id(t)] for t in (weight, bias_t) if t is not None and id(t) in claimed]
        if again:
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
            elif t is not None and t[0] == "softmax" and not _softmax_on_last_axis(t[1], z_shape):
                msg = f"block {name!r}: softmax at node {users[0].name!r} is not over the last axis; the block is treated as identity."
                warnings.warn(msg, stacklevel=2)
                notes.append(msg)
            elif t is not None and t[0] != "identity":
                transfer, kw, t_node = t[0], t[1], users[0].name
                if transfer == "softmax":
                    kw = {}
        w_shape = tuple(weight.shape)
        macs = LINEAR_OPS[m.op].macs(x_shape, z_shape, w_shape, dict(m.attrs))
        frozen = (m.bias,) if bias_t is not None and not bias_t.requires_grad else ()
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
            ". lwcompile needs at least one; train this model with an ordinary optimizer.")
    # One entry per trainable tensor (its first name): every tensor outside blocks, and block tensors that are
    # also read elsewhere (tied weights), which the outer optimizer steps on the gradient of those other uses.
    nonblock = tuple(n for n, p in gm.named_parameters()
                     if p.requires_grad and (id(p) not in claimed or id(p) in shared))
    return Partition(tuple(blocks), nonblock, _block_edges(gm, blocks), tuple(notes))


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

