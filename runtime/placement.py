"""Where each block's inner loop runs: a networkx graph of blocks, cut over devices into a Plan.

:func:`make_plan` checks the devices, builds the placement graph (:func:`build_graph`: block costs, memory and
activation bytes) and cuts it with one of the two algorithms of :mod:`lwcompile.runtime.placement_algorithms`:

* **replicated**: every device runs the forward/target graph; the inner loops are independent jobs scheduled on
  identical machines (LPT, local search, then branch-and-bound when small).
* **partitioned**: each device holds a contiguous stage of one topological order of the block DAG (a pipeline);
  an exact DP minimises the slowest stage, then the activation bytes crossing stages.

All functions are pure: blocks, edges and costs in, a :class:`lwcompile.runtime.plan.Plan` out.

Fused groups (``Config.fuse``, :mod:`lwcompile.passes.fuse`) are not units here: a plan places *blocks*, priced one
by one, and the local runtime fuses, per device, the members of a group that the plan put on that device
(:mod:`lwcompile.runtime.fused`). A group is thus a job that placement may split; the costs of a fused device
are an upper bound (fusion only removes per-op overhead).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence

import networkx as nx

from lwcompile.errors import ConfigError
from lwcompile.ir import Block, numel
from lwcompile.runtime.costs import BlockCost, block_costs
from lwcompile.runtime.placement_algorithms import (EXACT_MAX_BLOCKS, EXACT_NODE_BUDGET, exact_schedule, improve,
                                                    lower_bound, lpt, partition_contiguous, schedule_replicated)
from lwcompile.runtime.plan import Plan

# The algorithms stay importable from here, where callers have always found them.
__all__ = ["MODES", "make_plan", "resolve_devices", "build_graph", "topological_order", "sequential_edges",
           "lower_bound", "lpt", "improve", "exact_schedule", "schedule_replicated", "partition_contiguous",
           "EXACT_MAX_BLOCKS", "EXACT_NODE_BUDGET"]

MODES = ("replicated", "partitioned")


def make_plan(
    blocks: Sequence[Block],
    edges: Sequence[tuple[str, str, int]],
    steps: int,
    devices: Sequence[str] | int,
    mode: str = "replicated",
    profile: Mapping[str, float] | None = None,
    device_rate: float | None = None,
    optimizer_slots: int = 0,
    check_devices: bool = True,
    exact: bool = False,
) -> Plan:
    """Place the inner loops of `blocks` on `devices` and predict the inner phase's makespan.

    blocks:      the program's blocks, in program (topological) order.
    edges:       (producer, consumer, activation bytes) between blocks.
    steps:       inner iterations T per training step.
    devices:     device names ("cpu", "cuda:0", ...) or a count of simulated identical devices ("sim:0", ...).
    mode:        "replicated" (independent jobs) or "partitioned" (contiguous pipeline stages).
    profile:     measured seconds per block name; replaces the FLOP estimate for the blocks it names.
    device_rate: FLOP/s used to turn FLOPs into seconds; None measures a CPU matmul once per process (with its own
                 RNG: planning never touches torch's global random state).
    optimizer_slots: parameter-sized state tensors of the inner optimizer (gd 0, momentum/rmsprop 1, adam 2).
    exact:       cost each block's inner phase as one exact solve (``inner_optimizer="exact"``), not `steps` iterations.
    check_devices: refuse (ConfigError) device names this machine cannot run, e.g. "cuda:1" with one GPU, so the
                 plan fails here rather than at step time. False plans for another machine (pure: any names).

    Example:
        >>> from lwcompile.ir import Block
        >>> def fake(name, n):  # an n×n linear layer on a batch of 8
        ...     return Block(name, name, "linear", (), "relu", (), name + ".weight", None, (n, n), None, (8, n), (8, n), 2 * n * n)
        >>> blocks = [fake("fc1", 64), fake("fc2", 32), fake("fc3", 32)]
        >>> edges = [("fc1", "fc2", 8 * 32 * 4), ("fc2", "fc3", 8 * 32 * 4)]
        >>> plan = make_plan(blocks, edges, steps=10, devices=2, device_rate=1e9)
        >>> plan.assignment
        {'sim:0': ('fc1',), 'sim:1': ('fc2', 'fc3')}
        >>> plan.makespan == plan.lower_bound
        True
    """
    if mode not in MODES:
        raise ConfigError(f"mode={mode!r}: expected one of {MODES}.")
    names = resolve_devices(devices)
    if check_devices and any(not (d == "cpu" or d.startswith("sim:")) for d in names):
        from lwcompile.runtime.local import check_runnable  # imports torch: only when a real device is named

        check_runnable(names)
    if not blocks:
        raise ConfigError("make_plan got no blocks to place; the program must have at least one block.")
    costs = block_costs(blocks, steps, optimizer_slots, device_rate, profile, exact=exact)
    graph = build_graph(blocks, edges, costs)
    graph.graph.update(steps=steps, mode=mode)
    seconds = {n: graph.nodes[n]["cost"] for n in graph}
    order = topological_order(graph)
    if mode == "replicated":
        groups, algorithm = schedule_replicated(seconds, len(names))
    else:
        stages = partition_contiguous(order, seconds, _edge_bytes(graph), len(names))
        groups, algorithm = stages + [[] for _ in range(len(names) - len(stages))], "contiguous-dp"
    index = {n: i for i, n in enumerate(order)}  # a device runs its blocks producers first
    assignment = {d: tuple(sorted(g, key=index.__getitem__)) for d, g in zip(names, groups)}
    return Plan(
        mode=mode,
        devices=names,
        assignment=assignment,
        times={d: sum(seconds[b] for b in assignment[d]) for d in names},
        memory={d: sum(graph.nodes[b]["memory"] for b in assignment[d]) for d in names},
        makespan=max(sum(seconds[b] for b in g) for g in assignment.values()),
        lower_bound=lower_bound(seconds.values(), len(names)),
        graph=graph,
        algorithm=algorithm,
    )


def resolve_devices(devices: Sequence[str] | int) -> tuple[str, ...]:
    """Device names from a list of names (or torch.device objects), one name, or a count of simulated devices.

    Example:
        >>> resolve_devices(3)
        ('sim:0', 'sim:1', 'sim:2')
        >>> resolve_devices(["cpu", "cuda:0"])
        ('cpu', 'cuda:0')
    """
    if isinstance(devices, bool):  # bool is an int subclass; True devices is a mistake, not "1 device"
        raise ConfigError(f"devices={devices!r}: expected a positive device count or a list of device names.")
    if isinstance(devices, int):
        if devices < 1:
            raise ConfigError(f"devices={devices!r}: need at least 1 device to place blocks on.")
        return tuple(f"sim:{i}" for i in range(devices))
    if isinstance(devices, str):
        devices = [devices]
    try:
        items = list(devices)
    except TypeError:
        raise ConfigError(f"devices={devices!r}: expected a positive device count or a list of device names.") from None
    names = []
    for d in items:
        if type(d).__name__ == "device" and type(d).__module__ == "torch":  # torch.device, without importing torch
            d = str(d)
        if not isinstance(d, str) or not d:
            raise ConfigError(f"device {d!r} of type {type(d).__name__}: a device must be a name such as 'cpu' or 'cuda:0'.")
        names.append(d)
    if not names:
        raise ConfigError(f"devices={devices!r}: need at least 1 device to place blocks on.")
    if len(set(names)) != len(names):
        raise ConfigError(f"devices={names!r} names a device twice; list each device once.")
    return tuple(names)


def build_graph(
    blocks: Sequence[Block], edges: Sequence[tuple[str, str, int]], costs: Mapping[str, BlockCost]
) -> nx.DiGraph:
    """The placement graph: one node per block (cost in seconds, memory and FLOPs), one edge per producer ->
    consumer pair carrying activation bytes. Nodes keep program order. Rejects unknown names and cycles.

    Example:
        >>> from lwcompile.ir import Block
        >>> from lwcompile.runtime.costs import block_costs
        >>> b = [Block(n, n, "linear", (), "relu", (), n + ".weight", None, (4, 4), None, (2, 4), (2, 4), 32) for n in "ab"]
        >>> g = build_graph(b, [("a", "b", 32)], block_costs(b, steps=1, device_rate=1e9))
        >>> g.nodes["a"]["flops"], g.edges["a", "b"]["bytes"]
        (128, 32)
    """
    g = nx.DiGraph()
    for b in blocks:
        if b.name in g:
            raise ConfigError(f"block name {b.name!r} appears twice; block names must be unique.")
        c = costs[b.name]
        g.add_node(b.name, cost=c.seconds, memory=c.memory, flops=c.flops, measured=c.measured)
    for edge in edges:
        if len(edge) != 3:
            raise ConfigError(f"edge {edge!r}: expected (producer, consumer, activation bytes).")
        src, dst, nbytes = edge
        for end in (src, dst):
            if end not in g:
                raise ConfigError(f"edge {edge!r} names {end!r}, which is not a block; blocks are {list(g)[:5]}...")
        if src == dst:
            raise ConfigError(f"edge {edge!r} is a self-loop; a block cannot feed itself.")
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
            raise ConfigError(f"edge {edge!r}: activation bytes must be an integer >= 0.")
        # Two graph paths between the same pair of blocks carry two tensors: their bytes add up.
        prev = g.edges[src, dst]["bytes"] if g.has_edge(src, dst) else 0
        g.add_edge(src, dst, bytes=prev + nbytes)
    if not nx.is_directed_acyclic_graph(g):
        cycle = nx.find_cycle(g)
        raise ConfigError(f"the block edges contain a cycle {cycle}; edges must go from producer to consumer.")
    return g


def topological_order(graph: nx.DiGraph) -> list[str]:
    """A topological order of the blocks that stays as close to program order as the edges allow.

    Example:
        >>> g = nx.DiGraph([("b", "a")]); g.add_node("c")
        >>> topological_order(nx.DiGraph(g))
        ['b', 'a', 'c']
    """
    index = {n: i for i, n in enumerate(graph)}
    return list(nx.lexicographical_topological_sort(graph, key=index.__getitem__))


def _edge_bytes(graph: nx.DiGraph) -> dict[tuple[str, str], int]:
    return {(u, v): d["bytes"] for u, v, d in graph.edges(data=True)}


def sequential_edges(blocks: Sequence[Block]) -> list[tuple[str, str, int]]:
    """Edges of a plain chain: each block feeds the next with its output activation. A fallback for callers that
    have not traced the real data flow (it is exact for MLP-like models).

    Example:
        >>> from lwcompile.ir import Block
        >>> b = [Block(n, n, "linear", (), "relu", (), n + ".weight", None, (4, 4), None, (2, 4), (2, 4), 32) for n in "ab"]
        >>> sequential_edges(b)
        [('a', 'b', 32)]
    """
    return [(a.name, b.name, numel(a.output_shape) * a.dtype_bytes) for a, b in zip(blocks, blocks[1:])]

