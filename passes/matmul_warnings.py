"""Warnings for trainable parameters that feed a matmul-like op but are left to the outer optimizer.

Called by :func:`lwcompile.passes.partition.partition` after the blocks are chosen: a parameter that reaches a
matmul, conv, einsum, ... through layout-only ops and is no block's weight is likely a projection lwcompile did not
recognize, so ``prog.warnings`` says so (unless a note already explains that node: skip, tied weight, refused form).
"""
from __future__ import annotations

import torch.fx as fx

from lwcompile.passes import registry as R


# Ops whose output is linear in a weight operand (matmul-like): a trainable parameter feeding one and left to the
# outer optimizer is likely a projection lwcompile did not recognize, so the user is told. By name, so every spelling
# (function, tensor method, ATen overload) matches.
_MATMUL_LIKE = {"mm", "bmm", "matmul", "__matmul__", "__rmatmul__", "addmm", "baddbmm", "addbmm", "addmv", "mv",
                "einsum", "linear", "bilinear", "tensordot", "conv1d", "conv2d", "conv3d", "convolution",
                "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "_convolution", "scaled_dot_product_attention"}
# Ops that only re-lay out a weight on its way to the matmul (W.t(), W.view(...), W.to(...)): followed through.
_LAYOUT = {"t", "transpose", "permute", "view", "reshape", "contiguous", "expand", "unsqueeze", "squeeze", "flatten",
           "to", "type_as", "clone", "detach", "numpy_T", "_to_copy", "alias", "unflatten", "chunk", "split",
           "unbind", "getitem", "mT", "T", "getattr"}


def _op_name(node: fx.Node) -> str:
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return name.split(".")[0]


def _feeds_matmul(gm: fx.GraphModule, start: list[fx.Node]) -> fx.Node | None:
    """The first matmul-like node reached from ``start`` through layout-only ops (a linear module counts too)."""
    seen, stack = set(), list(start)
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "call_module":
            if R.linear_for_module(gm.get_submodule(n.target)) is not None:
                return n
            continue
        if n.op not in ("call_function", "call_method"):
            continue
        name = _op_name(n)
        if name in _MATMUL_LIKE:
            return n
        if name in _LAYOUT:
            stack.extend(n.users)
    return None


def matmul_fed_warnings(gm: fx.GraphModule, nonblock: tuple[str, ...], claimed: dict[int, str],
                        noted: set[str], uses: dict[int, list[fx.Node]]) -> list[str]:
    """One warning per trainable parameter that feeds a matmul-like op but is not a block's (so the outer
    optimizer trains it), unless a note already explains that op (skip, tied weight, a refused form)."""
    starts, out = uses, []
    for name in nonblock:
        t = gm.get_parameter(name)
        if id(t) in claimed:
            continue
        hit = _feeds_matmul(gm, starts.get(id(t), []))
        if hit is not None and hit.name not in noted:
            out.append(f"parameter {name!r} feeds the matmul-like node {hit.name!r} ({hit.format_node()}) but is not "
                       "a block's weight: the outer optimizer trains it on the backward's gradient (no local loss). "
                       "Write the projection as nn.Linear / F.linear / x @ W / torch.addmm(b, x, W) to make it a "
                       "block.")
    return out
