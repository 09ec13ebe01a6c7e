"""Fusion of identical blocks: groups of blocks whose inner loops run as one batched graph over stacked weights.

Blocks with the same op and arguments, parameter shapes, transfer function, frozen pattern and input/output shapes
(the projections of every layer of a transformer, repeated conv stages) share one traced inner graph
(:func:`lwcompile.passes.inner.inner_key`). :func:`fuse_groups` finds them (the pipeline's ``fuse`` stage; its record
is :class:`FusedGroups`); :func:`batched_graph` turns the shared graph into one graph over N stacked copies of its
inputs, with ``torch.func.vmap`` traced by ``make_fx``: mm becomes bmm, each element-wise op one launch over the
stack. The inner graph is a black box of N tensor inputs and outputs here, so whatever it takes (a target, a
residual, a pre-activation, any optimizer state) is stacked alike, and the batched graph computes per member exactly
what the shared graph computes (to float rounding: a bmm may sum in another order than an mm).

What is not fused, and why, is recorded in :attr:`FusedGroups.notes`: the exact solve (its custom op
``torch.ops.lwcompile.spd_solve`` has no vmap batching rule, and its errors name one block), and graphs holding any op
outside the aten/prims namespaces (:func:`unbatchable_ops`). The runtime (:mod:`lwcompile.runtime.fused`) decides
per step which members actually fuse (same graph, same argument shapes, same device).

Example:
    >>> import torch
    >>> from lwcompile.config import Config
    >>> from lwcompile.ir import Block
    >>> blk = lambda n: Block(n, n, "linear", (), "tanh", (), n + ".weight", None, (2, 3), None, (4, 3), (4, 2), 12)
    >>> fuse_groups((blk("a"), blk("b"), blk("c")), Config()).groups
    (('a', 'b', 'c'),)
    >>> fuse_groups((blk("a"), blk("b")), Config(fuse=False)).groups
    ()
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.fx as fx
from torch.fx.experimental.proxy_tensor import make_fx

from lwcompile.config import Config
from lwcompile.errors import LwcompileError
from lwcompile.ir import Block
from lwcompile.passes.exact_solver import EXACT
from lwcompile.passes.inner import inner_key

BATCHABLE_NAMESPACES = ("aten", "prims")  # ops torch.func.vmap has batching rules (or a fallback) for
# Fuse a group only when each member's linear op costs at most this many multiply-adds on the example batch.
# Fusion removes per-op overhead; past this size a block's inner loop is arithmetic- and cache-bound, and batching
# N of them made it slower on a 2-core AVX2 CPU (benchmarks/fusion.py: a 12-layer d-128 transformer at 64 rows,
# 3-4 M multiply-adds per projection, and the 2-layer LM at 2048 rows, 33 M, ran their inner phase ~0.9x; d 64 at
# 64-128 rows, <= 2 M, ran 1.3-1.6x faster).
FUSE_MAX_MACS = 2 ** 21


@dataclass(frozen=True)
class FusedGroups:
    """The fuse stage's record: ``groups`` (each >= 2 block names in block order, disjoint, members with equal inner
    keys and shapes) and ``notes`` (why blocks that look alike are not fused)."""

    groups: tuple[tuple[str, ...], ...] = ()
    notes: tuple[str, ...] = ()

    def group_of(self, name: str) -> tuple[str, ...] | None:
        """The group block ``name`` belongs to, or None when it runs alone."""
        return next((g for g in self.groups if name in g), None)


def _key(block: Block, config: Config) -> tuple:
    # the inner key (what the graph depends on) plus the example shapes (what its inputs look like)
    return (inner_key(block, config), tuple(block.input_shape), tuple(block.output_shape))


def block_macs(block: Block) -> int:
    """Multiply-adds of the block's linear op on the example batch: output elements × weights per output channel."""
    w = tuple(block.weight_shape)
    out = w[-1] if block.op == "matmul" else (w[1] if block.op.startswith("conv_transpose") else w[0])
    return math.prod(block.output_shape) * (math.prod(w) // max(out, 1))


def requires_fuse(blocks: Sequence[Block]) -> None:
    """Pre-condition: block names are unique (a group is a set of names)."""
    names = [b.name for b in blocks]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise LwcompileError(f"fuse: block names {dup} occur twice; the partition must name each block once.")


def fuse_groups(blocks: Sequence[Block], config: Config) -> FusedGroups:
    """Group the blocks that can run as one batched inner graph (``Config.fuse``; empty when off).

    Pre: :func:`requires_fuse`. Post: :func:`ensures_fuse` (groups disjoint, >= 2 members each, members with equal
    keys). Blocks of the exact solve are never fused (see the module docstring), nor blocks whose linear op costs
    more than :data:`FUSE_MAX_MACS` multiply-adds on the example batch (fusion would not pay); a note names them.
    """
    if not config.fuse:
        return FusedGroups((), ("Config.fuse=False: every block runs its own inner graph.",))
    by_key: dict[tuple, list[str]] = {}
    for b in blocks:
        by_key.setdefault(_key(b, config), []).append(b.name)
    alike = [tuple(names) for names in by_key.values() if len(names) > 1]
    if config.inner_optimizer == EXACT:
        # inner_key gives every exact block its own key; group them by structure only to say what is left unfused
        same: dict[tuple, list[str]] = {}
        for b in blocks:
            structure = config.replace(inner_optimizer="gd", prox_relative=False, residual_norm="none")
            same.setdefault(_key(b, structure), []).append(b.name)
        notes = tuple(f"blocks {names} are identical but not fused: inner_optimizer='exact' runs the custom op "
                      "torch.ops.lwcompile.spd_solve, which torch.func.vmap cannot batch, and its errors name one block"
                      for names in same.values() if len(names) > 1)
        return FusedGroups((), notes)
    by_name = {b.name: b for b in blocks}
    small = tuple(g for g in alike if block_macs(by_name[g[0]]) <= FUSE_MAX_MACS)
    notes = tuple(f"blocks {g} are identical but not fused: {block_macs(by_name[g[0]]):,} multiply-adds each on the "
                  f"example batch exceed FUSE_MAX_MACS = {FUSE_MAX_MACS:,} (batching blocks this large does not pay)"
                  for g in alike if g not in small)
    return FusedGroups(small, notes)


def ensures_fuse(blocks: Sequence[Block], config: Config, fused: FusedGroups) -> None:
    """Post-condition of :func:`fuse_groups`: every group names >= 2 known blocks, once each, with equal keys."""
    by_name = {b.name: b for b in blocks}
    seen: set[str] = set()
    for g in fused.groups:
        if len(g) < 2 or any(n not in by_name or n in seen for n in g):
            raise LwcompileError(f"fuse: group {g} must name >= 2 distinct blocks of the program, each in one group.")
        seen.update(g)
        if len({_key(by_name[n], config) for n in g}) != 1:
            raise LwcompileError(f"fuse: group {g} holds blocks whose inner graphs differ; they cannot be batched.")


def unbatchable_ops(gm: fx.GraphModule) -> list[str]:
    """The ops of ``gm`` outside :data:`BATCHABLE_NAMESPACES` (custom ops, which vmap has no batching rule for)."""
    bad = []
    for node in gm.graph.nodes:
        if node.op == "call_function" and isinstance(node.target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)):
            if node.target.namespace not in BATCHABLE_NAMESPACES:
                bad.append(str(node.target))
    return sorted(set(bad))


def batched_graph(gm: fx.GraphModule, stacked: Sequence[torch.Tensor],
                  in_dims: Sequence[int | None]) -> fx.GraphModule:
    """``gm`` run over a stack of inputs as one graph: ``batched(*stacked)[k][i] == gm(*args_i)[k]`` where
    ``args_i[j] = stacked[j][i]`` if ``in_dims[j] == 0`` else ``stacked[j]`` (an input all members share, e.g. lr).

    Traced once with fake tensors of ``stacked``'s shapes; every output is stacked along dim 0. Raises
    LwcompileError naming the op for a graph vmap cannot batch (the caller runs the members unfused instead).

    >>> g = torch.fx.symbolic_trace(lambda w, x, lr: (w - lr * (x @ w),))
    >>> bg = batched_graph(g, (torch.ones(3, 2, 2), torch.eye(2).expand(3, 2, 2), torch.tensor(0.5)), (0, 0, None))
    >>> bg(torch.ones(3, 2, 2), torch.eye(2).expand(3, 2, 2).contiguous(), torch.tensor(0.5))[0].shape
    torch.Size([3, 2, 2])
    """
    bad = unbatchable_ops(gm)
    if bad:
        raise LwcompileError(f"the inner graph calls {bad}, which torch.func.vmap has no batching rule for.")
    fn = torch.func.vmap(gm, in_dims=tuple(in_dims), out_dims=0)
    out = make_fx(fn, tracing_mode="fake")(*stacked)
    out.recompile()
    return out
