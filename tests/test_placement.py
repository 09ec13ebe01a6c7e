"""Placement, as specifications. Oracles are brute force written here, independent of runtime/placement.py."""
from __future__ import annotations

import doctest
import itertools
import json
import math
import random
import re

import networkx as nx
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lwcompile.errors import ConfigError
from lwcompile.ir import Block
from lwcompile.runtime import costs as costs_mod
from lwcompile.runtime import placement, plan as plan_mod
from lwcompile.runtime.costs import block_cost, block_costs, measure_device_rate
from lwcompile.runtime.placement import exact_schedule, improve, lpt, make_plan, topological_order
from lwcompile.runtime.plan import Plan

REL = 1e-9  # float sums in different orders may differ in the last bits


def fake_block(name: str, n: int = 8, batch: int = 4, bias: bool = True) -> Block:
    """An n×n linear layer on a batch of `batch`."""
    return Block(name, name, "linear", (), "relu", (), f"{name}.weight", f"{name}.bias" if bias else None,
                 (n, n), (n,) if bias else None, (batch, n), (batch, n), 2 * n * n)


def instance(job_costs: list[float]) -> tuple[list[Block], dict[str, float]]:
    """Blocks b0, b1, ... whose inner-phase times are exactly `job_costs` (via a profile)."""
    blocks = [fake_block(f"b{i}") for i in range(len(job_costs))]
    return blocks, {b.name: c for b, c in zip(blocks, job_costs)}


def brute_force_makespan(job_costs: list[float], m: int) -> float:
    """Optimal makespan over all m^n assignments."""
    return min(max(sum(c for c, d in zip(job_costs, where) if d == k) for k in range(m))
               for where in itertools.product(range(m), repeat=len(job_costs)))


def brute_force_stages(order: list[str], cost: dict[str, float], m: int) -> float:
    """Smallest max stage cost over every way to cut `order` into at most m contiguous stages."""
    n, best = len(order), math.inf
    for k in range(0, min(m, n) - 1 + 1):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            best = min(best, max(sum(cost[b] for b in order[a:z]) for a, z in zip(bounds, bounds[1:])))
    return best


def random_dag(rng: random.Random, n: int) -> tuple[list[Block], list[tuple[str, str, int]], dict[str, float]]:
    """Blocks listed in a random order, with edges that follow a hidden random topological order."""
    blocks, profile = instance([float(rng.randint(1, 9)) for _ in range(n)])
    hidden = [b.name for b in blocks]
    rng.shuffle(hidden)
    edges = [(u, v, rng.randint(1, 4) * 1024) for i, u in enumerate(hidden) for v in hidden[i + 1:] if rng.random() < 0.35]
    return blocks, edges, profile


def check_same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=REL, abs_tol=1e-12)


# ------------------------------------------------------------------------------------------------- cost model
def test_block_cost_is_inner_flops_and_params_times_one_plus_state_slots_plus_activations():
    b = fake_block("fc", n=16, batch=4)
    c = block_cost(b, steps=10, optimizer_slots=2, device_rate=1e9)
    assert c.flops == b.inner_flops(10)
    assert c.memory == b.param_bytes * 3 + b.activation_bytes
    assert c.seconds == pytest.approx(b.inner_flops(10) / 1e9)
    assert not c.measured


def test_a_profile_replaces_the_estimate_only_for_the_blocks_it_names():
    a, b = fake_block("a"), fake_block("b")
    cs = block_costs([a, b], steps=5, device_rate=1e9, profile={"a": 0.25})
    assert (cs["a"].seconds, cs["a"].measured) == (0.25, True)
    assert cs["b"].seconds == pytest.approx(b.inner_flops(5) / 1e9) and not cs["b"].measured


def test_the_measured_device_rate_is_a_positive_number_of_flops_per_second():
    rate = measure_device_rate()
    assert math.isfinite(rate) and rate > 0
    assert measure_device_rate() == rate  # measured once, then cached


# --------------------------------------------------------------------------------------------- replicated mode
@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=7), st.integers(1, 3))
def test_replicated_plan_is_optimal_on_tiny_instances_and_within_graham_bound(job_costs, m):
    blocks, profile = instance([float(c) for c in job_costs])
    plan = make_plan(blocks, [], steps=1, devices=m, profile=profile, device_rate=1e9)
    opt = brute_force_makespan(job_costs, m)
    assert plan.makespan >= plan.lower_bound - 1e-12
    assert plan.makespan <= (4 / 3 - 1 / (3 * m)) * opt + 1e-12
    assert plan.makespan == opt  # exact search runs on instances this small
    assert sorted(b for bs in plan.assignment.values() for b in bs) == sorted(profile)  # each block placed once


@pytest.mark.parametrize("seed", range(40))
def test_lpt_alone_meets_graham_bound_and_the_improvements_never_make_it_worse(seed):
    rng = random.Random(seed)
    m, n = rng.randint(2, 3), rng.randint(2, 8)
    job = {f"j{i}": rng.uniform(0.1, 10.0) for i in range(n)}
    opt = brute_force_makespan(list(job.values()), m)
    span = lambda groups: max(sum(job[j] for j in g) for g in groups)  # noqa: E731
    base = lpt(job, m)
    assert span(base) <= (4 / 3 - 1 / (3 * m)) * opt * (1 + REL)
    searched = improve(base, job)
    assert span(searched) <= span(base) * (1 + REL)
    exact, proven = exact_schedule(job, m, searched)
    assert proven and check_same(span(exact), opt)


def test_a_starved_exact_search_still_returns_a_schedule_no_worse_than_its_start():
    rng = random.Random(7)
    job = {f"j{i}": rng.uniform(1, 100) for i in range(18)}
    start = lpt(job, 4)
    groups, _ = exact_schedule(job, 4, start, budget=50)
    span = lambda gs: max(sum(job[j] for j in g) for g in gs)  # noqa: E731
    assert span(groups) <= span(start)
    assert sorted(j for g in groups for j in g) == sorted(job)


def test_large_replicated_instance_uses_local_search_and_stays_within_bounds():
    rng = random.Random(3)
    blocks, profile = instance([rng.uniform(1, 50) for _ in range(40)])
    plan = make_plan(blocks, [], steps=1, devices=6, profile=profile, device_rate=1e9)
    base = max(sum(profile[j] for j in g) for g in lpt(profile, 6))
    assert plan.lower_bound <= plan.makespan <= base * (1 + REL)
    assert plan.algorithm == "lpt+search"


def test_classic_lpt_trap_is_solved_optimally():
    blocks, profile = instance([3.0, 3.0, 2.0, 2.0, 2.0])  # LPT gives 7, the optimum is 6
    plan = make_plan(blocks, [], steps=1, devices=2, profile=profile, device_rate=1e9)
    assert plan.makespan == 6.0 == plan.lower_bound and plan.algorithm == "optimal"


# -------------------------------------------------------------------------------------------- partitioned mode
@pytest.mark.parametrize("seed", range(30))
def test_partitioned_stages_are_contiguous_respect_every_edge_and_match_brute_force(seed):
    rng = random.Random(seed)
    blocks, edges, profile = random_dag(rng, rng.randint(1, 8))
    m = rng.randint(1, 4)
    plan = make_plan(blocks, edges, steps=1, devices=[f"cuda:{i}" for i in range(m)], mode="partitioned",
                     profile=profile, device_rate=1e9, check_devices=False)  # planning for a GPU machine
    stage = {b: k for k, d in enumerate(plan.devices) for b in plan.assignment[d]}
    assert sorted(stage) == sorted(profile)
    for u, v, _ in edges:  # activations only flow to the same or a later stage
        assert stage[u] <= stage[v], (u, v, plan.assignment)
    order = [b for d in plan.devices for b in plan.assignment[d]]  # stages concatenated, in device order
    pos = {b: i for i, b in enumerate(order)}
    assert all(pos[u] < pos[v] for u, v, _ in edges)  # ... form one topological order
    assert order == topological_order(plan.graph)
    empty = [not plan.assignment[d] for d in plan.devices]
    assert empty == sorted(empty)  # unused devices come last
    assert check_same(plan.makespan, brute_force_stages(order, profile, m))
    assert plan.makespan >= plan.lower_bound - 1e-12


@pytest.mark.parametrize("seed", range(15))
def test_among_optimal_cuts_the_plan_sends_the_fewest_activation_bytes(seed):
    rng = random.Random(100 + seed)
    blocks, edges, profile = random_dag(rng, rng.randint(2, 7))
    m = rng.randint(2, 4)
    plan = make_plan(blocks, edges, 1, m, mode="partitioned", profile=profile, device_rate=1e9)
    order = topological_order(plan.graph)
    n, best = len(order), (math.inf, math.inf)
    for k in range(min(m, n)):
        for cuts in itertools.combinations(range(1, n), k):
            bounds = (0, *cuts, n)
            stage = {b: s for s, (a, z) in enumerate(zip(bounds, bounds[1:])) for b in order[a:z]}
            slowest = max(sum(profile[b] for b in order[a:z]) for a, z in zip(bounds, bounds[1:]))
            sent = sum(nb for u, v, nb in edges if stage[u] != stage[v])
            best = min(best, (slowest, sent))
    assert check_same(plan.makespan, best[0]) and plan.crossing_bytes == best[1]


def test_partitioned_mode_keeps_a_chain_in_order():
    blocks, profile = instance([4.0, 1.0, 1.0, 1.0, 1.0, 4.0])
    edges = placement.sequential_edges(blocks)
    plan = make_plan(blocks, edges, 1, ["cpu", "cuda:0", "cuda:1"], mode="partitioned", profile=profile, device_rate=1e9,
                     check_devices=False)
    assert plan.assignment == {"cpu": ("b0",), "cuda:0": ("b1", "b2", "b3", "b4"), "cuda:1": ("b5",)}
    assert plan.makespan == 4.0


# ------------------------------------------------------------------------------------------ the Plan as a value
@pytest.fixture
def small_plan() -> Plan:
    blocks = [fake_block("enc.fc1", 32), fake_block("enc.fc2", 16), fake_block('head"x"', 16)]
    edges = [("enc.fc1", "enc.fc2", 512), ("enc.fc2", 'head"x"', 256)]
    return make_plan(blocks, edges, steps=10, devices=["cpu", "cuda:0"], optimizer_slots=2, device_rate=1e9,
                     check_devices=False)  # a plan made for another machine: planning itself is pure


def test_plan_json_round_trips_to_an_equal_plan(small_plan):
    text = small_plan.to_json()
    assert json.loads(text) == small_plan.to_dict()
    back = Plan.from_json(text)
    assert back == small_plan
    assert nx.utils.graphs_equal(back.graph, small_plan.graph)
    assert back.device_of("enc.fc2") == small_plan.device_of("enc.fc2")


def test_plan_table_names_every_device_and_block_and_states_makespan_vs_lower_bound(small_plan):
    text = str(small_plan)
    for name in (*small_plan.devices, *small_plan.graph):
        assert name in text
    assert "makespan" in text and "vs lower bound" in text and "%" in text


def test_dot_has_one_cluster_per_device_and_every_block_and_edge(small_plan):
    dot = small_plan.to_dot()
    assert dot.startswith("digraph") and dot.count("{") == dot.count("}")
    assert dot.count("subgraph cluster_") == len(small_plan.devices)
    for b in small_plan.graph:
        assert '"' + b.replace('"', '\\"') + '"' in dot
    assert dot.count("->") == small_plan.graph.number_of_edges()
    assert "512 B" in dot


def test_draw_writes_a_valid_png(small_plan, tmp_path):
    path = small_plan.draw(str(tmp_path / "plan.png"))
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    import matplotlib.image

    assert matplotlib.image.imread(path).ndim == 3


def test_device_of_finds_each_block_and_rejects_unknown_names(small_plan):
    for d, bs in small_plan.assignment.items():
        for b in bs:
            assert small_plan.device_of(b) == d
    with pytest.raises(ConfigError, match="nope"):
        small_plan.device_of("nope")


def test_plan_times_memory_and_makespan_add_up(small_plan):
    g = small_plan.graph
    for d, bs in small_plan.assignment.items():
        assert small_plan.times[d] == pytest.approx(sum(g.nodes[b]["cost"] for b in bs))
        assert small_plan.memory[d] == sum(g.nodes[b]["memory"] for b in bs)
    assert small_plan.makespan == pytest.approx(max(small_plan.times.values()))
    costs = [g.nodes[b]["cost"] for b in g]
    assert small_plan.lower_bound == pytest.approx(max(max(costs), sum(costs) / len(small_plan.devices)))


def test_int_devices_are_simulated_and_named():
    blocks, profile = instance([1.0, 2.0])
    plan = make_plan(blocks, [], 1, 3, profile=profile, device_rate=1e9)
    assert plan.devices == ("sim:0", "sim:1", "sim:2")
    assert sum(1 for bs in plan.assignment.values() if not bs) == 1


# ---------------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("devices, shown", [
    (0, "0"), (-2, "-2"), (True, "True"), ([], "[]"), ([0, 1], "0"), ([None], "None"), (["cpu", "cpu"], "cpu"),
    (3.5, "3.5"),
])
def test_bad_devices_raise_config_error_naming_the_value(devices, shown):
    with pytest.raises(ConfigError, match=re.escape(shown)):
        make_plan([fake_block("a")], [], 1, devices, device_rate=1e9)


@pytest.mark.parametrize("kwargs, shown", [
    ({"mode": "pipeline"}, "pipeline"),
    ({"profile": {"ghost": 1.0}}, "ghost"),
    ({"profile": {"a": -1.0}}, "-1.0"),
    ({"steps": 0}, "steps=0"),
    ({"device_rate": 0}, "device_rate=0"),
    ({"edges": [("a", "zz", 4)]}, "zz"),
    ({"edges": [("a", "b", 4), ("b", "a", 4)]}, "cycle"),
    ({"edges": [("a", "b", -4)]}, "-4"),
    ({"optimizer_slots": -1}, "optimizer_slots=-1"),
])
def test_bad_arguments_raise_config_error_naming_the_value(kwargs, shown):
    args = {"blocks": [fake_block("a"), fake_block("b")], "edges": [], "steps": 1, "devices": 2, "device_rate": 1e9}
    with pytest.raises(ConfigError, match=re.escape(shown)):
        make_plan(**{**args, **kwargs})


def test_no_blocks_is_a_config_error():
    with pytest.raises(ConfigError, match="no blocks"):
        make_plan([], [], 1, 2, device_rate=1e9)


# ------------------------------------------------------------------------------------------- runnable examples
@pytest.mark.parametrize("module", [costs_mod, placement, plan_mod], ids=lambda m: m.__name__)
def test_docstring_examples_run(module):
    result = doctest.testmod(module)
    assert result.failed == 0 and result.attempted > 0
