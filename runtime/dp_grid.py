"""The 2-D rank grid of hybrid training: data-parallel groups × ranks that split the blocks (replicated plan).

With W ranks and a replicated plan over L devices, the grid has D = W / L rows of L ranks. Global rank
``g·L + j`` is *row* g (its batch shard: g of D), *column* j (the plan's device j: the blocks whose inner loops it
runs). The ranks of a row share a shard (every one runs the same forward, as the replicated runtime does) and
exchange new block weights by broadcast; the ranks of a column hold different shards of the same blocks and
all-reduce their sums (gradients, Gram statistics). A row's ranks are adjacent, so on a multi-GPU machine the
weight broadcasts stay inside a node and only the column all-reduces cross nodes.

``make_grid`` must be called by every rank (``torch.distributed.new_group`` is collective) in the same order.

Example (inside a 4-rank job)::

    grid = make_grid(layers=2)        # 2 data-parallel rows × 2 block-splitting columns
    grid.row, grid.col, grid.rows     # rank 3: (1, 1, 2)
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from lwcompile.errors import ConfigError


@dataclass(frozen=True)
class Grid:
    """This rank's place in the grid and the groups it talks in.

    rows, cols:   grid shape (data-parallel shards, ranks per shard).
    row, col:     this rank's shard index and plan device index.
    data_group:   the ranks of this column (all-reduces over shards); None: the whole job (cols == 1).
    layer_group:  the ranks of this row (weight broadcasts); None when cols == 1.
    """

    rows: int
    cols: int
    row: int
    col: int
    data_group: Any = None
    layer_group: Any = None


def make_grid(layers: int = 1) -> Grid:
    """Split the default process group into ``world / layers`` data-parallel rows of ``layers`` ranks each."""
    world, rank = dist.get_world_size(), dist.get_rank()
    if not isinstance(layers, int) or layers < 1 or world % layers:
        raise ConfigError(f"a grid of rows of {layers!r} ranks does not tile the job's {world} ranks: use a plan "
                          f"with a number of devices that divides {world} (e.g. prog.plan(devices=1 or "
                          f"{world}, mode='replicated')).")
    rows = world // layers
    if layers == 1:
        return Grid(rows, 1, rank, 0)
    data = layer = None
    # every rank creates every group, in the same order (new_group is collective over the whole job)
    for j in range(layers):
        g = dist.new_group([i * layers + j for i in range(rows)])
        if rank % layers == j:
            data = g
    for i in range(rows):
        g = dist.new_group([i * layers + j for j in range(layers)])
        if rank // layers == i:
            layer = g
    return Grid(rows, layers, rank // layers, rank % layers, data, layer)


def shard(batch: Any, index: int, count: int) -> Any:
    """Shard ``index`` of ``count``: contiguous rows (dim 0) of every tensor in ``batch`` (a tensor or a tuple).

    Example:
        >>> shard((torch.arange(5), torch.arange(5) * 10), 1, 2)
        (tensor([3, 4]), tensor([30, 40]))
    """
    if isinstance(batch, (tuple, list)):
        return type(batch)(shard(b, index, count) for b in batch)
    return torch.tensor_split(batch, count)[index] if isinstance(batch, torch.Tensor) else batch


__all__ = ["Grid", "make_grid", "shard"]
