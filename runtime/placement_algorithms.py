"""The two ways of cutting a program's blocks over devices, on plain costs (no graph, no torch).

* **replicated**: every device runs the forward/target graph, so the inner loops are independent jobs on identical
  machines. LPT (longest job first onto the least-loaded device), then moves/swaps off the busiest device, then an
  exact branch-and-bound when the instance is small. Each step only accepts strict improvements, so the result is
  never worse than LPT's (4/3 − 1/(3m)) guarantee, and optimal when the search finishes.
* **partitioned**: each device holds a contiguous stage of one topological order of the block DAG (a pipeline), so
  every edge runs forward or stays inside a stage. An exact DP over cut points minimises the slowest stage; a second
  DP, restricted to stages no slower than that, minimises the activation bytes crossing stages.

All functions are pure: job costs (seconds per block name) and edge bytes in, groups of block names out.
:func:`lwcompile.runtime.placement.make_plan` builds the block graph, calls these and assembles the Plan.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

EXACT_MAX_BLOCKS = 20  # above this, branch-and-bound rarely finishes within its budget; local search is kept
EXACT_NODE_BUDGET = 200_000  # search nodes (~0.3 s of Python) before we keep the best schedule found so far


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
