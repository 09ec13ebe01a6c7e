"""Where each block's inner loop runs: a networkx graph of blocks and two ways of cutting it over devices.

* **replicated**: every device runs the forward/target graph, so the inner loops are independent jobs on identical
  machines. LPT (longest job first onto the least-loaded device), then moves/swaps off the busiest device, then an
  exact branch-and-bound when the instance is small. Each step only accepts strict improvements, so the result is
  never worse than LPT's (4/3 − 1/(3m)) guarantee, and optimal when the search finishes.
* **partitioned**: each device holds a contiguous stage of one topological order of the block DAG (a pipeline), so
  every edge runs forward or stays inside a stage. An exact DP over cut points minimises the slowest stage; a second
  DP, restricted to stages no slower than that, minimises the activation bytes crossing stages.

All functions are pure: blocks, edges and costs in, a :class:`lwcompile.runtime.plan.Plan` out.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import networkx as nx

from lwcompile.errors import ConfigError
from lwcompile.ir import Block
from lwcompile.runtime.costs import BlockCost, block_costs
from lwcompile.runtime.plan import Plan

MODES = ("replicated", "partitioned")
EXACT_MAX_BLOCKS = 20  # above this, branch-and-bound rarely finishes within its budget; local search is kept
EXACT_NODE_BUDGET = 200_000  # search nodes (~0.3 s of Python) before we keep the best schedule found so far


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
    costs = block_costs(blocks, steps, optimizer_slots, device_rate, profile)
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


def lower_bound(costs: Sequence[float] | object, n_devices: int) -> float:
    """No schedule beats the largest job nor a perfect split of the total: max(largest, total / devices).

    Example:
        >>> lower_bound([3.0, 1.0, 1.0, 1.0], 2)
        3.0
    """
    costs = list(costs)
    return max(max(costs, default=0.0), math.fsum(costs) / n_devices)


# ----------------------------------------------------------------------------------------------- replicated mode
def lpt(costs: Mapping[str, float], n_devices: int) -> list[list[str]]:
    """Longest processing time first: each job, largest first, goes to the least-loaded device.
    Makespan ≤ (4/3 − 1/(3m)) × optimum (Graham 1969). Ties go to the lower device index, so it is deterministic.

    Example:
        >>> lpt({"a": 3, "b": 3, "c": 2, "d": 2, "e": 2}, 2)  # makespan 7; [a, b] / [c, d, e] gives 6
        [['a', 'c', 'e'], ['b', 'd']]
    """
    groups: list[list[str]] = [[] for _ in range(n_devices)]
    loads = [0.0] * n_devices
    for name in sorted(costs, key=lambda n: -costs[n]):  # sorted() is stable: equal jobs keep input order
        d = min(range(n_devices), key=loads.__getitem__)
        groups[d].append(name)
        loads[d] += costs[name]
    return groups


def improve(groups: list[list[str]], costs: Mapping[str, float], max_rounds: int = 10_000) -> list[list[str]]:
    """Local search: move one job off the busiest device, or swap it for a smaller one, whenever that lowers the
    busiest device's load. Every accepted step strictly lowers the sorted load vector, so it terminates and the
    makespan never goes up.

    Example:
        >>> improve([["a", "b"], ["c"]], {"a": 2, "b": 2, "c": 1})
        [['b'], ['c', 'a']]
    """
    groups = [list(g) for g in groups]
    loads = [sum(costs[j] for j in g) for g in groups]
    for _ in range(max_rounds):
        a = max(range(len(groups)), key=loads.__getitem__)
        if not _improve_once(groups, loads, costs, a):
            break
    return groups


def _improve_once(groups: list[list[str]], loads: list[float], costs: Mapping[str, float], a: int) -> bool:
    top = loads[a]
    eps = 1e-12 * top  # float noise must not count as an improvement, or the search could cycle
    for b in sorted(range(len(groups)), key=loads.__getitem__):
        if b == a:
            continue
        for x in groups[a]:
            if loads[b] + costs[x] < top - eps:  # move x: a gets lighter, b stays below the old top
                groups[a].remove(x)
                groups[b].append(x)
                loads[a] -= costs[x]
                loads[b] += costs[x]
                return True
            for y in groups[b]:
                d = costs[x] - costs[y]
                if d > eps and loads[b] + d < top - eps:  # swap x for smaller y
                    groups[a].remove(x)
                    groups[b].remove(y)
                    groups[a].append(y)
                    groups[b].append(x)
                    loads[a] -= d
                    loads[b] += d
                    return True
    return False


class _Stop(Exception):
    """Ends the branch-and-bound early: budget spent, or the lower bound reached."""


def exact_schedule(
    costs: Mapping[str, float], n_devices: int, incumbent: list[list[str]], budget: int = EXACT_NODE_BUDGET
) -> tuple[list[list[str]], bool]:
    """Branch-and-bound for the optimal makespan, starting from `incumbent` and only ever replacing it by a strictly
    better schedule. Returns (schedule, proven optimal). Symmetry is broken by never trying two devices with the same
    load for the same job.

    Example:
        >>> exact_schedule({"a": 3, "b": 3, "c": 2, "d": 2, "e": 2}, 2, [["a", "c", "e"], ["b", "d"]])  # LPT: 7
        ([['a', 'b'], ['c', 'd', 'e']], True)
    """
    jobs = sorted(costs, key=lambda n: -costs[n])
    sizes = [costs[j] for j in jobs]
    best = max((math.fsum(costs[j] for j in g) for g in incumbent), default=0.0)
    floor = lower_bound(sizes, n_devices)
    eps = 1e-12 * max(best, 1e-300)
    state = {"best": best, "found": None, "nodes": 0}
    loads = [0.0] * n_devices
    where = [0] * len(jobs)

    def search(i: int, top: float) -> None:
        state["nodes"] += 1
        if state["nodes"] > budget:
            raise _Stop
        if i == len(jobs):
            state["best"], state["found"] = top, list(where)
            if top <= floor + eps:
                raise _Stop  # cannot do better than the lower bound
            return
        seen = set()
        for d in sorted(range(n_devices), key=loads.__getitem__):  # lightest first finds good schedules early
            load = loads[d]
            if load in seen or load + sizes[i] >= state["best"] - eps:
                continue
            seen.add(load)
            loads[d] = load + sizes[i]
            where[i] = d
            search(i + 1, max(top, loads[d]))
            loads[d] = load

    proven = best <= floor + eps
    if not proven:
        try:
            search(0, 0.0)
            proven = True
        except _Stop:
            proven = state["best"] <= floor + eps
    if state["found"] is None:
        return [list(g) for g in incumbent], proven
    groups: list[list[str]] = [[] for _ in range(n_devices)]
    for j, d in zip(jobs, state["found"]):
        groups[d].append(j)
    return groups, proven


def schedule_replicated(costs: Mapping[str, float], n_devices: int) -> tuple[list[list[str]], str]:
    """LPT, then local search, then (for up to EXACT_MAX_BLOCKS jobs) branch-and-bound. Returns the groups and the
    name of the algorithm that produced them ("lpt+search", "lpt+search+bnb", or "optimal" when proven).

    Example:
        >>> schedule_replicated({"a": 3, "b": 3, "c": 2, "d": 2, "e": 2}, 2)  # LPT alone gives 7, the optimum is 6
        ([['c', 'e', 'd'], ['b', 'a']], 'optimal')
    """
    groups = improve(lpt(costs, n_devices), costs)
    if len(costs) > EXACT_MAX_BLOCKS:
        return groups, "lpt+search"
    groups, proven = exact_schedule(costs, n_devices, groups)
    return groups, "optimal" if proven else "lpt+search+bnb"


# ---------------------------------------------------------------------------------------------- partitioned mode
def partition_contiguous(
    order: Sequence[str], costs: Mapping[str, float], edges: Mapping[tuple[str, str], int], n_devices: int
) -> list[list[str]]:
    """Cut `order` (a topological order) into at most `n_devices` contiguous non-empty stages. Minimises the slowest
    stage exactly; among the cuts that achieve it, minimises the activation bytes of edges whose ends land in
    different stages (each such edge is sent once, producer to consumer). O(m·n²) time.

    Example:
        >>> partition_contiguous(["a", "b", "c", "d"], {"a": 1, "b": 1, "c": 1, "d": 1},
        ...                      {("a", "b"): 100, ("b", "c"): 1, ("c", "d"): 100}, 2)
        [['a', 'b'], ['c', 'd']]
    """
    n = len(order)
    k_max = min(n_devices, n)
    span = _span_costs(order, costs)
    inbound = _inbound_bytes(order, edges)
    # Pass 1: the optimal slowest stage. slow[k][i] = best max stage over the first i blocks in k stages.
    slow = [[math.inf] * (n + 1) for _ in range(k_max + 1)]
    slow[0][0] = 0.0
    for k in range(1, k_max + 1):
        for i in range(k, n + 1):
            slow[k][i] = min(max(slow[k - 1][j], span[j][i]) for j in range(k - 1, i))
    target = min(slow[k][n] for k in range(1, k_max + 1))
    limit = target + 1e-9 * max(target, 1e-300)  # same float sums as pass 1, but do not let rounding lose the optimum
    # Pass 2: fewest crossing bytes using only stages within the optimum. cut[k][i] = (bytes, previous cut).
    cut: list[list[tuple[float, int]]] = [[(math.inf, -1)] * (n + 1) for _ in range(k_max + 1)]
    cut[0][0] = (0.0, -1)
    for k in range(1, k_max + 1):
        for i in range(k, n + 1):
            cut[k][i] = min(
                ((cut[k - 1][j][0] + inbound[j][i], j) for j in range(k - 1, i) if span[j][i] <= limit),
                default=(math.inf, -1),
            )
    # Fewest bytes first, then fewest stages (fewer devices busy for the same makespan and traffic).
    k = min(range(1, k_max + 1), key=lambda k: (cut[k][n][0], k))
    stages, i = [], n
    while k > 0:
        j = cut[k][i][1]
        stages.append(list(order[j:i]))
        i, k = j, k - 1
    return stages[::-1]


def _span_costs(order: Sequence[str], costs: Mapping[str, float]) -> list[list[float]]:
    """span[j][i] = cost of blocks order[j:i], summed left to right (the same sums a direct check would do)."""
    n = len(order)
    span = [[0.0] * (n + 1) for _ in range(n + 1)]
    for j in range(n):
        total = 0.0
        for i in range(j + 1, n + 1):
            total += costs[order[i - 1]]
            span[j][i] = total
    return span


def _inbound_bytes(order: Sequence[str], edges: Mapping[tuple[str, str], int]) -> list[list[int]]:
    """inbound[j][i] = bytes on edges from blocks before position j into blocks order[j:i]: what stage (j, i]
    receives from earlier stages. Summing it over stages counts every crossing edge exactly once."""
    n = len(order)
    pos = {b: p for p, b in enumerate(order)}
    into: list[list[tuple[int, int]]] = [[] for _ in range(n)]  # consumer position -> (producer position, bytes)
    for (u, v), nbytes in edges.items():
        into[pos[v]].append((pos[u], nbytes))
    inbound = [[0] * (n + 1) for _ in range(n + 1)]
    for j in range(n):
        total = 0
        for i in range(j + 1, n + 1):
            total += sum(nb for p, nb in into[i - 1] if p < j)
            inbound[j][i] = total
    return inbound


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
    return [(a.name, b.name, _numel(a.output_shape) * a.dtype_bytes) for a, b in zip(blocks, blocks[1:])]


def _numel(shape: Sequence[int]) -> int:
    return math.prod(int(s) for s in shape)
